"""Federated learning (McMahan et al. 2017 and successors), simulated on one machine."""

from mlsyskit.fl.config import ATTACKS, FLConfig
from mlsyskit.fl.simulation import resume, run
from mlsyskit.fl.strategies import STRATEGIES, Strategy, StrategyOptions, make_strategy

__all__ = ["ATTACKS", "FLConfig", "STRATEGIES", "Strategy", "StrategyOptions", "make_strategy", "resume", "run"]
