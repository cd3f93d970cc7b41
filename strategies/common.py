"""Config pieces shared by built-in strategies (not a plugin itself)."""

from pydantic import Field

from prunebench import BEFORE_LLM, StrategyConfig


class KeepAtPointConfig(StrategyConfig):
    """A keep ratio applied at one removal point: the shape of the signal-free baselines."""

    keep_ratio: float = Field(0.5, gt=0, le=1, description="fraction of visual tokens kept")
    after_layer: int = Field(BEFORE_LLM, ge=BEFORE_LLM, description="-1 = before the LLM")

    @classmethod
    def search_space(cls, trial):
        return cls(keep_ratio=trial.suggest_float("keep_ratio", 0.1, 1.0),
                   after_layer=trial.suggest_int("after_layer", BEFORE_LLM, trial.n_layers // 2))
