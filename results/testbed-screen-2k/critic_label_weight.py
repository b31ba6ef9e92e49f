"""Screen only (not in the package): critic-context with another label_weight a, the labels' share
of the critic's target t = (1 - a) q_{k+1} + a onehot(y) (critic.py; the default's a = 0.5).
a = 0: the critics follow their stage's prediction alone, the paper's backward message
beta_k(z) = p(y | z_k) as the later blocks predict it; a = 1: the labels alone, a free head that
the next stage trains on h_k and sends upstream. Registered as critic-context-a0, -a09, -a1."""
from bll_ds.method.critic import ContextCriticFeedback, LastStageCritic
from bll_ds.method.variants import register


def _with_label_weight(name: str, weight: float) -> None:
    last = type(f"LastStageCritic_{name}", (LastStageCritic,), {"label_weight": weight})
    register(type(f"CriticContext_{name}", (ContextCriticFeedback,), {
        "name": f"critic-context-{name}", "label_weight": weight,
        "last_stage_block": classmethod(lambda cls, config, options: last(config, options))}))


for _name, _weight in (("a0", 0.0), ("a09", 0.9), ("a1", 1.0)):
    _with_label_weight(_name, _weight)
