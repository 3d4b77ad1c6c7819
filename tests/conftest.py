"""Make the flat top-level modules (schedule, model, data, train, sample, metrics) importable from tests."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
