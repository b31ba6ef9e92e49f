"""Cheaper readouts and tables (bll_ds/method/variant_options.py): the spec syntax, the loss terms by
hand, the sampled softmax's unbiased partition and its stated bias on a tiny vocabulary, the
declared FLOPs and bytes against counters, and exact resume with tables refreshed every k steps."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (TINY_HIDDEN, TINY_SEQ, TINY_VOCAB, launch_failure, run_pretrain, stage_losses,
                     tiny_model_config)
from torch.utils.flop_counter import FlopCounterMode

from bll_ds.method import variants
from bll_ds.method.feedback import build_feedback
from bll_ds.method.variant_options import (IGNORE, Candidates, VariantOptions, fixed_projection, parse_spec,
                                        run_name, shared_candidates)
from bll_ds.measure.flops import readout_flops_per_token, stage_step_flops
from bll_ds.pipeline.feedback_channel import LAG, publishes_after, table_index, tables_published

H, V, T = TINY_HIDDEN, TINY_VOCAB, TINY_SEQ


@pytest.fixture
def config(tmp_path):
    return tiny_model_config(tmp_path)


# --- the spec ----------------------------------------------------------------------------------

def test_a_spec_names_a_variant_and_its_options():
    assert parse_spec("dgl-context:dim=64:neg=2048") == ("dgl-context", VariantOptions(dim=64, neg=2048))
    assert parse_spec("prototype:table=bf16:refresh=4") == ("prototype", VariantOptions(table="bf16", refresh=4))
    assert run_name("dgl-context:dim=64:neg=2048") == "dgl-context-dim64-neg2048"
    variant = variants.get("dgl-context:neg=2048:dim=64")  # any order: one canonical spec
    assert variant == variants.get("dgl-context:dim=64:neg=2048") and variant.name == "dgl-context:dim=64:neg=2048"
    assert variant.block is variants.get("dgl-context").block and not variant.per_token_readout
    assert variants.get("dgl:dim=8").per_token_readout  # a reduced width alone keeps the per-token slices
    assert variants.get("prototype:dim=0") == variants.get("prototype")


def test_options_are_an_attribute_of_the_built_block_not_a_class_made_at_run_time(config):
    plain, reduced = build_feedback("dgl", config), build_feedback("dgl:dim=4:neg=8", config)
    assert type(plain) is type(reduced) is variants.get("dgl").block
    assert plain.options == VariantOptions() and reduced.options == VariantOptions(dim=4, neg=8)
    assert reduced.variant == variants.get("dgl:neg=8:dim=4") and reduced.head.weight.shape == (V, 4)


@pytest.mark.parametrize("spec,message", [
    ("dgl:width=4", "key one of"), ("dgl:dim", "key one of"), ("dgl:dim=-1", ">= 0"),
    ("prototype:refresh=0", ">= 1"), ("prototype:table=fp8", "table=fp8 is not one of ('fp32', 'bf16')"),
    ("gaussian:guard=-1", "guard=-1 must be a number >= 0"), ("gaussian:guard=x", "must be a number"),
    ("gaussian:variance=free", "is not one of ('fixed', 'learned')"), ("bernoulli:variance=learned", "does not take"),
    ("prototype:guard=2", "does not take"),
    ("dgl:table=bf16", "does not take the option(s) ['table']"), ("drtp:dim=4", "does not take"),
    ("gaussian:neg=8", "does not take"), ("nope:dim=4", "unknown BLL variant"),
])
def test_a_bad_spec_is_refused_naming_the_fix(spec, message):
    with pytest.raises(ValueError, match=None) as err:
        variants.get(spec)
    assert message in str(err.value)
    assert not variants.is_known(spec)


def test_the_agreement_variants_take_their_guard_and_variance_from_the_spec(config):
    assert parse_spec("gaussian:guard=0.5:variance=learned") == ("gaussian", VariantOptions(guard=0.5, variance="learned"))
    assert variants.get("bernoulli:guard=2.0") == variants.get("bernoulli:guard=2")  # one canonical spelling
    assert run_name("gaussian:guard=0.5") == "gaussian-guard0.5"
    plain, tuned = build_feedback("gaussian", config), build_feedback("gaussian:guard=0.25:variance=learned", config)
    assert plain.guard_weight == 1.0 and not plain.log_var_a.requires_grad
    assert tuned.guard_weight == 0.25 and tuned.log_var_a.requires_grad and tuned.log_var_b.requires_grad


@pytest.mark.parametrize("flag,new_form", [("--bll_guard_weight", "gaussian:guard=0.5"),
                                           ("--bll_learn_variance", "gaussian:variance=learned")])
def test_the_old_option_flags_are_refused_naming_the_spec(flag, new_form):
    from bll_ds.infra.errors import UserError
    from bll_ds.run.config import parse_run_config

    with pytest.raises(UserError, match=f"{flag} is no longer a flag") as err:
        parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o",
                          "--bll_variant", "gaussian", f"{flag}=1"])
    assert new_form in str(err.value)


def test_the_trainer_refuses_a_bad_option_before_it_starts():
    from bll_ds.run.config import parse_run_config

    with pytest.raises(SystemExit):
        parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o",
                          "--bll_variant", "dgl:dim=x"])
    cfg = parse_run_config(["--model", "m.json", "--deepspeed_config", "d.json", "--out", "o",
                            "--bll_variant", "dgl-context:dim=4:neg=3"])
    assert cfg.bll.variant == "dgl-context:dim=4:neg=3"


# --- the loss terms by hand --------------------------------------------------------------------

def _rms_norm(hidden, norm):
    return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight


def test_reduced_dgl_is_ce_of_the_projected_normed_output(config):
    torch.manual_seed(0)
    feedback = build_feedback("dgl:dim=3", config)
    hidden, labels = torch.randn(2, T, H), torch.randint(0, V, (2, T))
    loss, terms = feedback.loss(hidden, labels)
    z = _rms_norm(hidden, feedback.norm) @ feedback.reduce.weight.t()
    assert z.shape == (2, T, 3) and feedback.head.weight.shape == (V, 3)
    by_hand = F.cross_entropy((z @ feedback.head.weight.t()).reshape(-1, V), labels.reshape(-1))
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6) and "readout_candidates" not in terms
    # P_k starts as R^T, R with orthonormal columns, the same R the last stage compresses W_out with.
    R = fixed_projection(H, 3)
    assert torch.allclose(R.t() @ R, torch.eye(3), atol=1e-6)
    assert torch.equal(feedback.reduce.weight.detach(), R.t())


def test_reduced_prototype_starts_as_the_heads_readout_restricted_to_the_projection(config):
    torch.manual_seed(1)
    cls = variants.get("prototype:dim=4:table=bf16")
    feedback = build_feedback(cls.name, config)
    w_out = torch.randn(V, H)
    message = cls.compose_message(w_out, ())
    R = fixed_projection(H, 4)
    assert message.dtype == torch.bfloat16 and message.shape == cls.message_shape(config) == (V, 4)
    assert torch.equal(message, (w_out @ R).to(torch.bfloat16))
    feedback.prepare(message)
    hidden, labels = torch.randn(1, T, H), torch.randint(0, V, (1, T))
    loss, _ = feedback.loss(hidden, labels)
    # g_k is the identity at initialisation, so the logits are norm(h) R R^T W_out^T (bf16 table).
    logits = _rms_norm(hidden, feedback.norm) @ R @ message.float().t()
    assert loss.item() == pytest.approx(F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1)).item(), rel=1e-5)
    # What the stage sends on is g_k(its table), in bf16, as wide as the table it received.
    published = cls.compose_message(feedback.publish(), ())
    assert published.dtype == torch.bfloat16 and published.shape == (V, 4)


def test_sampled_loss_is_the_corrected_ce_over_the_shared_candidates(config):
    torch.manual_seed(2)
    feedback = build_feedback("dgl:neg=3", config)
    hidden, labels = torch.randn(1, T, H), torch.tensor([[1, 1, 4, IGNORE, 4, 7]])
    loss, terms = feedback.loss(hidden, labels)
    # The block's own generator, seeded by (sample_seed, draws so far): both are checkpointed.
    assert int(feedback.draws) == 1 and {"sample_seed", "draws"} <= set(feedback.state_dict())
    candidates = shared_candidates(labels, V, 3, torch.Generator().manual_seed(int(feedback.sample_seed)))
    assert candidates.ids[:3].tolist() == [1, 4, 7] and len(candidates) == 6 == terms["readout_candidates"]
    p = 3 / (V - 3)
    assert candidates.log_weight.tolist() == pytest.approx([0, 0, 0] + [math.log(1 / p)] * 3)
    logits = (_rms_norm(hidden, feedback.norm) @ feedback.head.weight.t())[0]
    per_token = []
    for t in range(T):
        if labels[0, t] == IGNORE:
            per_token.append(torch.tensor(0.0))  # an ignored position adds 0 to the token mean
            continue
        kept = logits[t, candidates.ids] + candidates.log_weight
        per_token.append(torch.logsumexp(kept, 0) - logits[t, labels[0, t]])
    assert loss.item() == pytest.approx(torch.stack(per_token).mean().item(), rel=1e-5)


def test_context_heads_read_their_targets_from_the_same_candidates(config):
    torch.manual_seed(3)
    feedback = build_feedback("dgl-context:dim=4:neg=2", config)
    labels = torch.randint(0, V, (2, T))
    loss, terms = feedback.loss(torch.randn(2, T, H), labels)
    assert {"ce", "context_ce_1", "context_ce_2", "readout_candidates"} <= set(terms)
    assert all(math.isfinite(float(v)) for v in terms.values()) and math.isfinite(loss.item())
    candidates = shared_candidates(labels, V, 2)
    from bll_ds.method.context import preceding_tokens
    for offset in (1, 2):
        targets = preceding_tokens(labels, offset)
        assert ((candidates.position(targets) != IGNORE) == (targets != IGNORE)).all()


# --- the sampled softmax's estimator, enumerated --------------------------------------------------

def test_shared_candidates_draws_distinct_non_targets_reproducibly():
    labels = torch.tensor([[3, 3, 9, IGNORE]])
    torch.manual_seed(11)
    a = shared_candidates(labels, 50, 10)
    torch.manual_seed(11)
    b = shared_candidates(labels, 50, 10)
    assert torch.equal(a.ids, b.ids) and a.ids[:2].tolist() == [3, 9]
    negatives = a.ids[2:].tolist()
    assert len(set(negatives)) == 10 and not {3, 9} & set(negatives)
    everything = shared_candidates(labels, 12, 100)  # fewer left than asked: all of them, weight 1
    assert sorted(everything.ids.tolist()) == list(range(12)) and everything.log_weight.abs().max() == 0


@pytest.mark.parametrize("negatives", [1, 2, 3, 5, 6])
def test_the_partition_estimate_is_unbiased_and_the_loss_bias_is_low_and_shrinks(negatives):
    """Every sample of `negatives` items out of the 6 non-targets of an 8-token vocabulary,
    enumerated: the mean of the corrected partition sum is Z exactly; the mean loss is at most the
    full cross-entropy (Jensen), exact when every non-target is drawn, and closer with more."""
    vocab, targets = 8, torch.tensor([2, 5])
    torch.manual_seed(4)
    logits = torch.randn(vocab, dtype=torch.float64) * 2
    rest = [v for v in range(vocab) if v not in targets.tolist()]
    full_z = logits.exp().sum()
    full_loss = torch.logsumexp(logits, 0) - logits[2]
    estimates, losses = [], []
    for subset in itertools.combinations(rest, negatives):
        p = negatives / len(rest)
        candidates = Candidates(torch.cat([targets, torch.tensor(subset)]),
                                torch.tensor([0.0, 0.0] + [math.log(1 / p)] * negatives, dtype=torch.float64), vocab)
        kept = logits[candidates.ids] + candidates.log_weight
        estimates.append(kept.exp().sum())
        losses.append(torch.logsumexp(kept, 0) - kept[candidates.position(torch.tensor(2))])
    assert torch.stack(estimates).mean().item() == pytest.approx(full_z.item(), rel=1e-12)
    bias = torch.stack(losses).mean().item() - full_loss.item()
    assert bias <= 1e-12
    if negatives == len(rest):
        assert bias == pytest.approx(0.0, abs=1e-12)
    _BIASES[negatives] = bias
    if len(_BIASES) == 5:
        ordered = [_BIASES[n] for n in sorted(_BIASES)]
        assert all(a <= b for a, b in zip(ordered, ordered[1:])), ordered


_BIASES: dict[int, float] = {}


# --- declared costs against counters ---------------------------------------------------------------

@pytest.mark.parametrize("spec", ["dgl-context:dim=3:neg=2", "dgl:dim=5", "prototype:dim=4:neg=3"])
def test_declared_readout_flops_match_the_flop_counter(config, spec):
    torch.manual_seed(6)
    cls = variants.get(spec)
    feedback = build_feedback(spec, config)
    feedback.prepare(cls.compose_message(torch.randn(V, H), ()) if cls.sends_table else None)
    if cls.sends_table:
        feedback.targets()  # m_k = g_k(P), once per step: step_flops, not the per-token readout
    batch = 1
    # Distinct targets, so that the candidate count reaches the declared bound (n + tokens, <= V).
    labels = torch.randperm(V)[:batch * T].reshape(batch, T)
    hidden = torch.randn(batch, T, H, requires_grad=True)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = feedback.loss(hidden, labels)
        loss.backward()
    declared = readout_flops_per_token(config, spec, batch * T) * batch * T
    assert counter.get_total_flops() == pytest.approx(declared, rel=1e-6)


def test_overhead_share_is_the_readout_and_feedback_over_the_stage(config):
    full, cheap = (stage_step_flops(config, 2, T, "bll", spec, T, 4) for spec in ("dgl-context", "dgl-context:dim=2:neg=1"))
    assert full[1].bll_overhead == cheap[1].bll_overhead == 0 and full[0].model == cheap[0].model
    assert full[0].bll_overhead == pytest.approx(18 * H * V * 4 * T)
    assert cheap[0].bll_overhead == pytest.approx((6 * H * 2 + 3 * 6 * 2 * min(V, 1 + T)) * 4 * T)
    assert 0 < cheap[0].bll_overhead_share < full[0].bll_overhead_share < 1
    bp = stage_step_flops(config, 2, T, "bp", "dgl-context", T, 4)
    assert [s.bll_overhead_share for s in bp] == [0.0, 0.0]


def test_table_bytes_follow_width_dtype_and_refresh(config):
    full = variants.get("prototype").table_bytes_per_step(config, 4)
    assert full == V * H * 4
    assert variants.get("prototype:dim=4:table=bf16").table_bytes_per_step(config, 4) == V * 4 * 2
    assert variants.get("prototype:dim=4:table=bf16:refresh=4").table_bytes_per_step(config, 4) == V * 4 * 2 / 4
    assert variants.get("dgl-context:dim=4:neg=8").table_bytes_per_step(config, 4) == 0


def test_the_lag_rule_with_refresh():
    assert [table_index(t, 1) for t in range(1, 7)] == [max(t - LAG, 0) for t in range(1, 7)]
    assert [table_index(t, 3) for t in range(1, 10)] == [0, 0, 0, 0, 3, 3, 3, 6, 6]
    assert [publishes_after(j, 3) for j in range(7)] == [True, False, False, True, False, False, True]
    assert [tables_published(s, 3) for s in (0, 2, 3, 5, 6)] == [1, 1, 2, 2, 3]
    # Never a table that has not been published yet, never older than LAG + k - 1 steps.
    for k in (1, 2, 3, 5):
        for t in range(1, 30):
            j = table_index(t, k)
            assert publishes_after(j, k) and j <= max(t - LAG, 0)
            assert t - j <= LAG + k - 1 or j == 0


# --- through the trainer: bytes counted, resume exact -------------------------------------------------

REFRESHED = "prototype:dim=8:neg=16:table=bf16:refresh=3"


def _args(out, data, steps=8, extra=()):
    return ["--model", "models/test-1m.json", "--deepspeed_config", "ds_configs/test-1m.json", "--tokenizer", "char",
            "--steps", str(steps), "--seq_len", "32", "--stages", "3", "--method", "bll", "--bll_variant", REFRESHED,
            "--log_interval", "1", "--eval_interval", "0", "--final_eval_batches", "2", "--save_interval", "4",
            "--no-measure_matmul_peak", "--data", str(data), "--out", str(out), *extra]


@pytest.mark.launcher
def test_refreshed_tables_resume_exactly_and_travel_as_declared(tmp_path, cache_dir, text_corpus):
    """Killed after step 4 -- between refreshes: the table in use was published after step 3 and
    the next comes after step 6 -- and resumed, the emulated run ends bit for bit where a straight
    one does; the launched pipeline (its own inbox and outbox) computes the same losses."""
    straight, resumed, launched = tmp_path / "straight", tmp_path / "resumed", tmp_path / "launched"
    result = run_pretrain(_args(straight, text_corpus, extra=["--emulate"]), ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)
    result = run_pretrain(_args(resumed, text_corpus, extra=["--emulate", "--exit_interval", "4"]), ranks=None,
                          cache_dir=cache_dir)
    assert result.returncode == 0 and "continue with --resume" in result.stdout, launch_failure(result)
    result = run_pretrain(_args(resumed, text_corpus, extra=["--emulate", "--resume"]), ranks=None, cache_dir=cache_dir)
    assert result.returncode == 0, launch_failure(result)
    assert stage_losses(straight, 3) == stage_losses(resumed, 3)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, resumed)]
    assert [d["params_sha256"] for d in summaries[0]["stages_detail"]] == \
        [d["params_sha256"] for d in summaries[1]["stages_detail"]]

    # Bytes against the counter: P_0 and the tables after steps 3 and 6, [V, 8] in bf16, per hop.
    detail = summaries[0]["stages_detail"]
    vocab = json.loads((straight / "model_config.json").read_text())["vocab_size"]
    for k in (1, 2):
        assert detail[k]["tables_sent"] == tables_published(8, 3) == 3
        assert detail[k]["bytes_up"] == 3 * vocab * 8 * 2
    assert all(0 < d["bll_overhead_flops_share"] < 1 for d in detail[:2]) and detail[2]["bll_overhead_flops_share"] == 0

    result = run_pretrain(_args(launched, text_corpus), ranks=3, cache_dir=cache_dir, master_port=29692)
    assert result.returncode == 0, launch_failure(result)
    losses_l, losses_e = stage_losses(launched, 3), stage_losses(straight, 3)
    assert set(losses_l) == set(losses_e)
    assert max(abs(losses_l[key] - losses_e[key]) / abs(losses_e[key]) for key in losses_e) <= 1e-4
    launched_detail = json.loads((launched / "summary.json").read_text())["stages_detail"]
    assert [d["bytes_up"] for d in launched_detail] == [d["bytes_up"] for d in detail]
