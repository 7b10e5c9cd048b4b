"""Shared plumbing every stage uses: settings, errors, file I/O, devices, processes, the Hub upload, utilities.

The core imports nothing else from ``stda_hf`` (only the package root's constants).
"""
