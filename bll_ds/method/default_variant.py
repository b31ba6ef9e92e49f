"""The BLL variant a run trains when --bll_variant is not given (no torch import: the run config reads it).

critic-context: the feedback network's method, downstream-trained. Stage k+1 trains a critic of h_k
toward its own prediction and sends it upstream; stage k's local loss is the critic's readout of h_k
plus the reconstruction of the two preceding tokens (critic.py, context.py). Its options keep it
cheap at real vocabularies: the critic in 128 dimensions and a softmax over the micro-batch's
targets and 2,048 sampled negatives. At V = 32k on llama-1b shapes that is 3.8% of one decoder
layer's training FLOPs and 6.7% of a full fp32 table per hop and step (`python -m bll_bench
variants`), inside the budget (5%, 1/8); 128 is the widest power of two inside it. The width is
what the quality asks for: stage k's critic loss reaches h_k only through the r directions of the
critic's projection, and on the character-level testbed r = 64 of H = 128 trailed the full critic
by 3.9% of held-out loss half-way through its budget (docs/results/quality.md). On a model with H <= 128 or
V <= 2,048 those two options change nothing: the readout is already that narrow, or every item is
a candidate.

labels=0.9 is the labels' share of the critic's target (the rest is the next stage's own
prediction). It costs nothing; it is a quality choice. The more the critic follows the later
stages' prediction, the more it hands block k's own errors back to it where the later blocks add
little: on the 8-stage testbed 0.9 ends level with dgl-context on two seeds (means 1.5490 and
1.5493) and 0.7% below the share 0.5 (docs/results/quality.md).

extrap=2: stage k reads the critic extrapolated over its two-step lag, C + 2 (C - C_prev), from the
two latest messages (message_extrapolation.py): three element-wise passes over the message per
step and two messages held, no byte sent. On the testbed it ends below the critic read as received
on both seeds at S = 8 (1.5454 and 1.5473 against 1.5500 and 1.5480; every stage's training loss
0.3-0.6% lower at the end) and 0.2% below it at S = 16 (one seed). At S = 16 it is level with
dgl-context, not better: 1.5433 and 1.5447 against 1.5427 and 1.5398 (two seeds, 0.2% behind on
the means).
"""

DEFAULT_VARIANT = "critic-context:dim=128:neg=2048:labels=0.9:extrap=2"
