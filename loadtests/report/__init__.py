"""The reports: a load-test run's figures (figures.py), its markdown report and the one markdown
table writer every suite's report uses (markdown.py; `python -m loadtests.report.markdown FOLDER`
rewrites a run's report), and every suite's PNG plots (plots.py)."""
