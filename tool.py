"""
The SQL tool: the model's query runs against people.db, and what comes back is the text of the
database turn. prepare_data.py formats its training dialogs with format_rows, so the model sees
at evaluation exactly the format it was trained on.

Database turn format (documented in the README):
  - each row's values joined with ' | ', rows joined with '\n'; NULL for a missing value
  - a query that returns no row: 'no rows'
  - a refused, malformed or failing query: 'error: <short reason>'
"""

import re
import sqlite3
import time
from pathlib import Path

NO_ROWS = 'no rows'


def format_rows(rows):
    """rows: sequence of tuples of column values -> the database turn's text."""
    if not rows:
        return NO_ROWS
    return '\n'.join(' | '.join('NULL' if v is None else str(v) for v in row) for row in rows)


def format_error(reason):
    return f'error: {reason}'


# -----------------------------------------------------------------------------
# The sandbox. The model's SQL is untrusted input, so every query runs on a read-only connection
# under an authorizer that only permits reading the `people` table, with a time limit, a cap on
# the SQL's length and caps on the result's rows and bytes. Every failure becomes an error turn;
# the model never sees partial data. Error reasons (the text after 'error: '):
#   'not valid UTF-8', 'query too long', 'empty query', 'only one statement allowed',
#   'not allowed', 'timed out', 'too many rows', 'result too large',
#   or sqlite's own short message, e.g. 'near "SELEC": syntax error', 'no such column: x'

# harmless, deterministic scalar and aggregate functions (LIKE and GLOB are functions too). Not
# printf/format, randomblob, zeroblob: one call can spin for seconds between progress checks.
ALLOWED_FUNCTIONS = frozenset('''
    abs avg coalesce count glob group_concat ifnull iif instr length like lower ltrim max min
    nullif replace round rtrim substr substring sum total trim typeof upper
'''.split())
# sqlite's cap on any one string, blob or row. No value the model can see is longer than max_bytes,
# and a small cap keeps even quadratic functions (instr, replace, trim) fast within one VM step.
MAX_VALUE_BYTES = 4096
CTE_NAME = re.compile(r'(\w+)\s*(?:\([^()]*\))?\s*\bAS\s*(?:NOT\s+)?(?:MATERIALIZED\s*)?\(', re.I)
MAX_REASON_CHARS = 100  # sqlite messages can echo the model's SQL back; keep the turn short


class Refused(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class SqlTool:

    def __init__(self, db_path, time_limit_s=0.05, max_rows=8, max_bytes=512, max_sql_bytes=1024):
        path = Path(db_path).resolve()
        if not path.is_file():  # a setup error, not model input: fail loudly, naming the path
            raise FileNotFoundError(f'SqlTool: no database file at {path}')
        # mode=ro: sqlite itself refuses every write, whatever gets past the authorizer
        self.conn = sqlite3.connect(path.as_uri() + '?mode=ro', uri=True,
                                    isolation_level=None, check_same_thread=False)
        self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
        # every real table name, virtual tables sqlite makes on demand (dbstat, json_each) included;
        # read before the authorizer is on. A CTE may not borrow one of these names (_authorize).
        self.tables = {n.lower() for (n,) in self.conn.execute(
            'SELECT name FROM sqlite_master UNION SELECT name FROM pragma_module_list')}
        self.conn.set_authorizer(self._authorize)
        self.conn.set_progress_handler(self._progress, 1000)  # called every 1000 VM steps
        self.time_limit_s, self.max_rows = time_limit_s, max_rows
        self.max_bytes, self.max_sql_bytes = max_bytes, max_sql_bytes
        self._deadline, self._denied, self._ctes = float('inf'), False, set()

    def _authorize(self, action, arg1, arg2, db_name, source):
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK  # an endless recursive CTE is stopped by the time limit
        if action == sqlite3.SQLITE_READ and db_name in ('main', None):
            if arg1 == 'people':  # arg1: the table, arg2: the column ('' for count(*)-style use)
                return sqlite3.SQLITE_OK
            # count(*) over a CTE checks the CTE's name with no column: it reads no value itself
            # (its body's reads were checked), but a CTE named like a real table must not let
            # `SELECT count(*) FROM population` through elsewhere in the same query
            if arg2 == '' and (arg1 or '').lower() in self._ctes:
                return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or '').lower() in ALLOWED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        self._denied = True  # sqlite's message for a denial varies; remember it was us
        return sqlite3.SQLITE_DENY

    def _progress(self):
        return time.perf_counter() > self._deadline  # nonzero aborts the query (SQLITE_INTERRUPT)

    def __call__(self, sql):
        """sql: str or bytes (straight from model tokens) -> (database turn text, ok)."""
        try:
            return self._query(sql), True
        except Refused as e:
            return format_error(e.reason), False
        except UnicodeError:  # invalid bytes, or a str holding lone surrogates
            return format_error('not valid UTF-8'), False
        except sqlite3.Error as e:
            return format_error(self._reason(e)), False
        finally:
            self._deadline = float('inf')

    def _query(self, sql):
        raw = bytes(sql) if isinstance(sql, (bytes, bytearray)) else sql.encode('utf-8')
        if len(raw) > self.max_sql_bytes:
            raise Refused('query too long')
        text = raw.decode('utf-8')
        named = CTE_NAME.findall(text) if '(' in text else ()  # a CTE's body is in brackets
        self._ctes = {n for n in map(str.lower, named)
                      if n not in self.tables and not n.startswith(('sqlite_', 'pragma_'))}
        self._denied = False
        self._deadline = time.perf_counter() + self.time_limit_s
        cur = self.conn.cursor()
        try:
            cur.execute(text)
            if cur.description is None:  # '' or only comments: no statement ran
                raise Refused('empty query')
            rows = cur.fetchmany(self.max_rows + 1)  # one extra row tells us there are too many
        finally:
            cur.close()
        if len(rows) > self.max_rows:
            raise Refused('too many rows')
        out = format_rows(rows)
        if len(out.encode('utf-8')) > self.max_bytes:
            raise Refused('result too large')
        return out

    def _reason(self, e):
        """sqlite3.Error -> a short, stable reason."""
        if self._denied:
            return 'not allowed'
        if getattr(e, 'sqlite_errorname', None) == 'SQLITE_INTERRUPT':
            return 'timed out'
        if getattr(e, 'sqlite_errorname', None) == 'SQLITE_TOOBIG':
            return 'result too large'
        if str(e).startswith('Could not decode'):  # e.g. CAST(x'ff' AS TEXT) in the result
            return 'not valid UTF-8'
        if isinstance(e, sqlite3.ProgrammingError):  # raised by Python's module, not sqlite
            if 'one statement' in str(e):
                return 'only one statement allowed'
            return 'not allowed'  # '?' placeholders, NUL characters
        return str(e)[:MAX_REASON_CHARS]
