"""The application floor: the command line (cli), the runners behind it (runs, budget_runs),
the demo, and the offline model zoo (zoo/). Nothing below imports from here."""
