import os
import sys

# the project's modules are flat scripts at the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
