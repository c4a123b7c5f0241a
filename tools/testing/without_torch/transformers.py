# Stands in for an absent `transformers`: on PYTHONPATH first, it makes `import transformers` fail as on a machine
# without it, so `make test-python` also checks that the tools' tests pass there (issue 12).
raise ImportError("transformers is hidden by tools/testing/without_torch (the no-torch run of make test-python)")
