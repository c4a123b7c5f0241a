# Stands in for an absent `torch`: on PYTHONPATH first, it makes `import torch` fail as on a machine
# without it, so `make test-python` also checks that the tools' tests pass there (issue 12).
raise ImportError("torch is hidden by tools/testing/without_torch (the no-torch run of make test-python)")
