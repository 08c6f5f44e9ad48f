"""Predict a recipe's training cost before any run (the split into modules follows)."""
from distill.plan.cost import *  # noqa: F401,F403
