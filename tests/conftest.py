import os
import sys

# tests import the helpers in this folder as plain modules
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
