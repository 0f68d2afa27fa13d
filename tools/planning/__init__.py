"""The planner behind tools/plan.py: prices, preemption traces, checkpoint intervals, spot
policies and their Monte Carlo simulation. tools/ is not a package: put tools/ on sys.path
and ``from planning.prices import load_prices``."""
