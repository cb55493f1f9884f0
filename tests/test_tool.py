"""
Tests for the SQL sandbox in tool.py, run against a real small people.db built in tmp_path.
The model's SQL is untrusted: every hostile input must give an error turn, never raise, and
leave the database file byte-identical.
"""

import hashlib
import random
import sqlite3
import time
from pathlib import Path

import pytest

from tool import SqlTool, format_rows

PEOPLE = [
    ('Ada Smith', '3/7/1975', 'France', 'Paris', 'engineer'),
    ("Liam O'Brien", '12/1/1960', 'Ireland', 'Dublin', 'teacher'),
    ('Noor Haddad', '30/11/1988', None, 'Amman', 'doctor'),  # a missing value prints as NULL
] + [(f'Person {i:02d}', f'{i % 28 + 1}/{i % 12 + 1}/19{50 + i}', 'Spain', 'Madrid', 'clerk')
     for i in range(30)]


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / 'people.db'
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE people(name TEXT PRIMARY KEY, birth_date TEXT, birth_place TEXT, '
                 'current_address TEXT, occupation TEXT)')
    conn.execute('CREATE TABLE population(name TEXT PRIMARY KEY, split TEXT)')
    conn.executemany('INSERT INTO people VALUES (?, ?, ?, ?, ?)', PEOPLE)
    conn.executemany('INSERT INTO population VALUES (?, ?)',
                     [(p[0], 'ood' if i % 5 == 0 else 'train') for i, p in enumerate(PEOPLE)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def tool(db_path):
    return SqlTool(db_path)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# -----------------------------------------------------------------------------
# the normal query forms give the right rows

@pytest.mark.parametrize('sql, expected', [
    ("SELECT birth_date FROM people WHERE name = 'Ada Smith';", '3/7/1975'),
    ("SELECT current_address FROM people WHERE name = 'Liam O''Brien'", 'Dublin'),
    ("SELECT birth_date FROM people WHERE name = 'Nobody Here';", 'no rows'),
    ("SELECT birth_place, occupation FROM people WHERE name = 'Ada Smith'", 'France | engineer'),
    ("SELECT birth_place FROM people WHERE name = 'Noor Haddad'", 'NULL'),
    ("  select OCCUPATION from PEOPLE where NAME = 'Ada Smith' ;  \n", 'engineer'),
    ("SELECT count(*) FROM people", str(len(PEOPLE))),
    ("SELECT upper(occupation), length(name) FROM people WHERE lower(name) LIKE 'ada%'",
     'ENGINEER | 9'),
    ("SELECT name FROM people WHERE birth_place = 'Ireland' OR birth_place IS NULL ORDER BY name",
     "Liam O'Brien\nNoor Haddad"),
    # CTEs and subqueries over `people` are legitimate reads
    ("WITH t AS (SELECT name, occupation FROM people) SELECT occupation FROM t "
     "WHERE name = 'Ada Smith'", 'engineer'),
    ("SELECT n FROM (SELECT name AS n FROM people WHERE birth_place = 'France')", 'Ada Smith'),
    ("SELECT name FROM people WHERE name = (SELECT max(name) FROM people "
     "WHERE occupation = 'doctor')", 'Noor Haddad'),
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) SELECT x FROM c",
     '1\n2\n3'),
    ('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 5) SELECT count(*) FROM c',
     '5'),
    ("WITH a AS (SELECT DISTINCT occupation FROM people), b(o) AS MATERIALIZED (SELECT * FROM a) "
     "SELECT count(*) FROM b", '4'),
    ("SELECT count(*) FROM (SELECT DISTINCT birth_place FROM people)", '4'),
    (b"SELECT occupation FROM people WHERE name = 'Ada Smith'", 'engineer'),  # bytes from tokens
])
def test_query(tool, sql, expected):
    assert tool(sql) == (expected, True)


def test_matches_format_rows(tool):
    # the tool's turn text is exactly what prepare_data.py trains on
    rows = [p[:2] for p in sorted(PEOPLE)[:3]]
    text, ok = tool('SELECT name, birth_date FROM people ORDER BY name LIMIT 3')
    assert ok and text == format_rows(rows)


# -----------------------------------------------------------------------------
# hostile, malformed, failing, slow or too-big input: an error turn, and the file untouched

HOSTILE = [
    # writes and schema changes
    ('DROP TABLE people', 'not allowed'),
    ('DELETE FROM people', 'not allowed'),
    ("INSERT INTO people VALUES ('Eve', '1/1/2000', 'X', 'Y', 'spy')", 'not allowed'),
    ("REPLACE INTO people(name) VALUES ('Ada Smith')", 'not allowed'),
    ("UPDATE people SET occupation = 'spy' WHERE name = 'Ada Smith'", 'not allowed'),
    ('CREATE TABLE t(x)', 'not allowed'),
    ('CREATE TEMP TABLE t(x)', 'not allowed'),
    ('CREATE VIEW v AS SELECT * FROM population', 'not allowed'),
    ('ALTER TABLE people ADD COLUMN x', 'not allowed'),
    ('CREATE INDEX i ON people(occupation)', 'not allowed'),
    ('VACUUM', 'not allowed'),
    ('ANALYZE', 'not allowed'),
    ('REINDEX', 'not allowed'),
    ('BEGIN', 'not allowed'),
    ('SAVEPOINT s', 'not allowed'),
    ("ATTACH DATABASE ':memory:' AS m", 'not allowed'),
    ("ATTACH DATABASE 'other.db' AS m", 'not allowed'),
    ('DETACH DATABASE main', 'not allowed'),
    # schema and settings
    ('PRAGMA table_info(people)', 'not allowed'),
    ('PRAGMA writable_schema=1', 'not allowed'),
    ('PRAGMA journal_mode=WAL', 'not allowed'),
    ("SELECT * FROM pragma_table_info('people')", 'not allowed'),
    ('SELECT count(*) FROM dbstat', 'not allowed'),
    ("SELECT * FROM json_each('[1,2]')", 'not allowed'),
    # other tables, however they are reached
    ('SELECT * FROM population', 'not allowed'),
    ('SELECT count(*) FROM population', 'not allowed'),
    ("SELECT split FROM population WHERE name = 'Ada Smith'", 'not allowed'),
    ("SELECT name FROM people WHERE name IN (SELECT name FROM population WHERE split = 'ood')",
     'not allowed'),
    ('WITH t AS (SELECT split FROM population) SELECT * FROM t', 'not allowed'),
    ('SELECT p.name, q.split FROM people p JOIN population q ON p.name = q.name', 'not allowed'),
    ('SELECT * FROM sqlite_master', 'not allowed'),
    ('SELECT sql FROM sqlite_schema', 'not allowed'),
    ('SELECT * FROM sqlite_temp_master', 'not allowed'),
    ('SELECT * FROM main.population', 'not allowed'),
    # a CTE named like a real table must not open the real one elsewhere in the query
    ('SELECT (WITH population AS (SELECT 1) SELECT count(*) FROM population), '
     '(SELECT count(*) FROM population)', 'not allowed'),
    ('WITH x AS (SELECT 1) SELECT count(*) FROM population', 'not allowed'),
    ('WITH dbstat AS (SELECT 1) SELECT (SELECT count(*) FROM dbstat)', 'not allowed'),
    # functions outside the whitelist
    ("SELECT load_extension('/tmp/evil.so')", 'not allowed'),
    ('SELECT randomblob(1000000000)', 'not allowed'),
    ('SELECT zeroblob(1000000000)', 'not allowed'),
    ('SELECT sqlite_version()', 'not allowed'),
    ("SELECT printf('%.*c', 100000, 'x')", 'not allowed'),
    # more than one statement
    ('SELECT 1; DROP TABLE people', 'only one statement allowed'),
    ('SELECT 1; SELECT 2', 'only one statement allowed'),
    # slow
    ('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c',
     'timed out'),
    ('SELECT count(*) FROM people a, people b, people c, people d, people e', 'timed out'),
    # too big
    ('SELECT * FROM people', 'too many rows'),
    ('SELECT group_concat(name || birth_date || occupation) FROM people', 'result too large'),
    ('SELECT group_concat(a.name) FROM people a, people b', 'result too large'),  # > 4 KiB value
    ("WITH RECURSIVE c(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM c) SELECT max(s) FROM c",
     'result too large'),
    ('SELECT ' + ' ' * 2000 + '1', 'query too long'),
    # malformed
    (b'SELECT \xff\xfe', 'not valid UTF-8'),
    ("SELECT CAST(x'ff' AS TEXT)", 'not valid UTF-8'),  # invalid UTF-8 made inside the query
    ('SELECT \ud800', 'not valid UTF-8'),  # a str with a lone surrogate cannot be encoded
    ('', 'empty query'),
    ('  \n ', 'empty query'),
    ('-- only a comment', 'empty query'),
    ('garbage text', 'near "garbage": syntax error'),
    ('SELEC birth_date FROM people', 'near "SELEC": syntax error'),
    ("SELECT birth_date FROM people WHERE name = 'Ada", "unrecognized token: \"'Ada\""),
    ('SELECT shoe_size FROM people', 'no such column: shoe_size'),
    ('SELECT 1 FROM nowhere', 'no such table: nowhere'),
    ("SELECT '\x00'", 'not allowed'),
    ('SELECT ?', 'not allowed'),
]


@pytest.mark.parametrize('sql, reason', HOSTILE)
def test_hostile(tool, db_path, sql, reason):
    before = digest(db_path)
    text, ok = tool(sql)
    assert not ok and text == f'error: {reason}'
    assert digest(db_path) == before
    assert tool("SELECT occupation FROM people WHERE name = 'Ada Smith'") == ('engineer', True)


def test_endless_query_times_out_quickly(tool):
    t0 = time.perf_counter()
    text, ok = tool('WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) '
                    'SELECT count(*) FROM c')
    assert (text, ok) == ('error: timed out', False)
    assert time.perf_counter() - t0 < 1.0


def test_limits_are_parameters(db_path):
    tool = SqlTool(db_path, max_rows=2, max_bytes=30, max_sql_bytes=60)
    assert tool('SELECT name FROM people ORDER BY name LIMIT 2') == ('Ada Smith\nLiam O\'Brien', True)
    assert tool('SELECT name FROM people LIMIT 3') == ('error: too many rows', False)
    assert tool("SELECT 'abcdefghijklmnopqrstuvwxyz0123456789'") == ('error: result too large', False)
    assert tool('SELECT 1' + ' ' * 60) == ('error: query too long', False)


def test_fuzz_never_raises(tool, db_path):
    # random bytes and mangled queries: always (str, bool), errors are error turns
    before = digest(db_path)
    rng = random.Random(0)
    base = b"SELECT birth_date FROM people WHERE name = 'Liam O''Brien';"
    for i in range(300):
        if i % 2:
            sql = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            sql = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                sql[rng.randrange(len(sql))] = rng.randrange(256)
            sql = bytes(sql)
        text, ok = tool(sql)
        assert isinstance(text, str) and (ok or text.startswith('error: '))
    assert digest(db_path) == before


def test_missing_db_is_a_setup_error(tmp_path):
    missing = tmp_path / 'nope' / 'people.db'
    with pytest.raises(FileNotFoundError, match='nope'):
        SqlTool(missing)
    assert not missing.exists()  # and nothing was created


def test_odd_path(db_path, tmp_path):
    odd = tmp_path / 'a dir?with#odd%20chars&mode=rwc'
    odd.mkdir()
    path = odd / 'people.db'
    path.write_bytes(db_path.read_bytes())
    tool = SqlTool(str(path))
    assert tool("SELECT occupation FROM people WHERE name = 'Ada Smith'") == ('engineer', True)
    assert tool('DROP TABLE people')[1] is False
    assert path.read_bytes() == db_path.read_bytes()
