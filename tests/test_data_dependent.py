"""Ops whose output size depends on tensor values, and values read from tensor data: the size policy
(upper bound, fraction, given sizes, a callable), the bounds from value ranges, the sizes a real run
records, and the errors where no size can be chosen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import memtrace
from memtrace.datadep import SizePolicy
from memtrace.measure import measure_cpu


def allocations_of(report, op: str) -> list[int]:
    return [a.requested_bytes for a in report.allocations if a.op == op and a.iteration == 0]


class Positives(nn.Module):
    """Keeps the positive entries of its input: a boolean-mask index, sized by the values."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        return y[y > 0]


def test_boolean_mask_takes_the_upper_bound_by_default():
    r = memtrace.report(Positives(), (4, 8), device="cpu", optimizer="sgd")
    # y[y > 0] selects at most all 32 elements: 32 float32 = 128 B
    assert allocations_of(r, "aten.index.Tensor") == [128]
    assert r.assumptions == ("index in the root module: output size 32 of at most 32 (2 calls) (upper bound)",)


@pytest.mark.parametrize("policy, size", [(0.25, 8), ({"": 5}, 5), ({"*": [3, 7]}, 3), ({":index": 0.5}, 16),
                                          (lambda site: site.bound // 4, 8)])
def test_the_policy_chooses_the_size(policy, size):
    r = memtrace.report(Positives(), (4, 8), device="cpu", optimizer="sgd", data_dependent=policy)
    assert allocations_of(r, "aten.index.Tensor") == [size * 4]


def test_a_list_of_sizes_is_taken_call_by_call():
    r = memtrace.report(Positives(), (4, 8), device="cpu", optimizer="sgd", data_dependent={"": [3, 7]})
    sizes = [a.requested_bytes // 4 for a in r.allocations if a.op == "aten.index.Tensor"]
    assert sizes == [3, 7]  # one call per iteration
    assert r.assumptions == ("index in the root module: output size 3 to 7 of at most 32 (2 calls) (given)",)


@pytest.mark.parametrize("policy, error, text", [
    ("lower", ValueError, "data_dependent='lower' is unknown"),
    (2.0, ValueError, "must be in (0, 1]"),
    (3, ValueError, "a single number is a fraction"),
    ({"": -1}, ValueError, "must be a size >= 0"),
    ({1: 3}, TypeError, "patterns"),
    ({"": "some"}, TypeError, "valid: 'upper'"),
])
def test_bad_policies_are_refused_before_tracing(policy, error, text):
    with pytest.raises(error, match=None) as info:
        memtrace.report(Positives(), (4, 8), device="cpu", data_dependent=policy)
    assert text in str(info.value)


def test_a_size_over_the_bound_is_refused():
    with pytest.raises(memtrace.TraceError, match="size 40, over the largest it allows, 32"):
        memtrace.report(Positives(), (4, 8), device="cpu", data_dependent={"": 40})


def test_a_pattern_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="names 'lin:nonzero', which matched no op.*the step's: :index"):
        memtrace.report(Positives(), (4, 8), device="cpu", data_dependent={"lin:nonzero": 3})


class Repeats(nn.Module):
    """repeat_interleave by counts it reads from its input: any output size is possible."""

    def forward(self, x):
        counts = x.abs().long().sum(-1)
        return x.repeat_interleave(counts, dim=0)


def test_an_unbounded_size_must_be_given():
    with pytest.raises(memtrace.TraceError, match=r"allows any size.*data_dependent=\{':repeat_interleave': N\}"):
        memtrace.report(Repeats(), (4, 8), device="cpu", train=False)
    r = memtrace.report(Repeats(), (4, 8), device="cpu", train=False, data_dependent={":repeat_interleave": 10})
    assert 10 * 8 * 4 in allocations_of(r, "aten.index_select.default")  # the 10 rows gathered, float32


class Levels(nn.Module):
    """The distinct values of a tensor made of two ``full``s: at most 5 (3 to 7), however long it is."""

    def forward(self, x):
        levels = torch.cat([torch.full((100,), 3), torch.full((50,), 7)])
        return x * levels.unique().numel()


def test_value_ranges_bound_unique():
    r = memtrace.report(Levels(), (2,), device="cpu", optimizer=None, train=False)
    assert r.assumptions == ("unique in the root module: output size 5 of at most 5 (2 calls) (upper bound)",)


class TopExpert(nn.Module):
    """Counts tokens per expert with bincount of argmax indices: at most 4 bins, one per expert."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 4)

    def forward(self, x):
        counts = self.router(x).argmax(-1).bincount()
        return x.sum() * counts.sum()


def symbolic_bincount() -> bool:
    """PyTorch before 2.6 has no fake kernel that sizes bincount symbolically."""
    from memtrace.datadep import _symbolic_outputs

    try:
        _symbolic_outputs(torch.ops.aten.bincount.default, (torch.zeros(4, dtype=torch.long),), {})
        return True
    except Exception:
        return False


def test_indices_bound_bincount():
    if not symbolic_bincount():
        with pytest.raises(memtrace.TraceError, match="bincount sizes its output by tensor values, and this "
                                                      "PyTorch's fake kernel for it cannot size it"):
            memtrace.report(TopExpert(), (16, 8), device="cpu", optimizer=None, train=False)
        return
    r = memtrace.report(TopExpert(), (16, 8), device="cpu", optimizer=None, train=False)
    assert r.assumptions[0].startswith("bincount in the root module: output size 4 of at most 4")


def test_value_ranges_follow_only_ops_that_keep_values():
    from memtrace.values import KnownValues

    values = KnownValues()
    with torch._subclasses.FakeTensorMode():
        levels = torch.full((4,), 3)
        values.after(torch.ops.aten.full.default, ((4,), 3), {}, levels)
        doubled = torch.empty(4, dtype=torch.long)
        values.after(torch.ops.aten.mul.Tensor, (levels, 2), {}, doubled)
        summed = torch.empty((), dtype=torch.long)
        values.after(torch.ops.aten.sum.default, (levels,), {}, summed)
    assert values.of(levels) == (3, 3) and values.of(doubled) == (6, 6)
    assert values.of(summed) is None  # a sum can take any value


class ValueRoutedExperts(nn.Module):
    """A mixture-of-experts layer that gathers each expert's tokens with nonzero, as transformers' eager
    experts do."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 2)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows = (choice == i).nonzero().squeeze(-1)
            out = out.index_add(0, rows, expert(x[rows]))
        return out


def test_value_routed_experts_are_an_upper_bound_and_exact_with_the_real_sizes():
    torch.manual_seed(0)
    model = ValueRoutedExperts()
    kwargs = dict(optimizer="sgd", optimizer_kwargs={"lr": 0.1})
    measured = measure_cpu(model, (64, 4), record_data_dependent=True, **kwargs)
    upper = memtrace.report(model, (64, 4), device="cpu", **kwargs)
    # every expert takes all 64 rows in the upper bound; together they take 64 in the real run
    assert upper.peak_bytes > measured.peak_bytes
    assert [len(v) for v in measured.data_dependent.values()] == [4]  # 2 experts x 2 iterations
    given = memtrace.report(model, (64, 4), device="cpu", data_dependent=measured.data_dependent, **kwargs)
    assert given.peak_bytes == measured.peak_bytes


def test_item_values_can_be_given():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)

    r = memtrace.report(Branch(), (2, 8), device="cpu", data_dependent={":item": [True]})
    assert r.layer("a").gradient_bytes > 0 and r.layer("b").gradient_bytes == 0
    assert "(2 calls): True (given)" in r.assumptions[0]


def test_assumed_values_are_named_when_the_step_fails_later():
    class SplitByCounts(nn.Module):
        def forward(self, x):
            counts = (x > 0).sum(-1).tolist()  # fake: zeros, which do not sum to the rows
            return torch.cat([p.sum(0, keepdim=True) for p in x.flatten().split(counts)])

    with pytest.raises(memtrace.TraceError, match=r"before it, 4 value\(s\) were read from tensor data.*the last in "
                                                  r"the root module.*data_dependent=\{':item': \[\.\.\.\]\}"):
        memtrace.report(SplitByCounts(), (4, 8), device="cpu", optimizer=None)


def test_policy_keeps_each_choice():
    policy = SizePolicy({"a.*:nonzero": 0.5})
    assert policy.choose("a.b", "nonzero", 10) == 5
    assert policy.choose("c", "nonzero", 10) == 10  # no pattern: the upper bound
    assert [c.how for c in policy.choices] == ["fraction 0.5", "upper bound"]
    assert policy.unused() == []


def test_sizes_and_values_come_from_their_own_patterns():
    from memtrace.datadep import ITEM

    policy = SizePolicy({"*": 3, "r:item": [2.5, True]})
    assert policy.choose("r", "nonzero", 10) == 3
    assert policy.choose("r", ITEM, None, 0) == 2.5  # a value read from data may be any number
    assert policy.choose("x", ITEM, None, 0) == 0  # "*" gives sizes alone: this value is assumed
    policy.known("r", ITEM)  # a value the trace holds takes its turn: the list is at its start again
    assert policy.choose("r", ITEM, None, 0) == 2.5
    with pytest.raises(TypeError, match="a number or a bool"):
        SizePolicy({"r:item": "x"})


class ChecksItsInput(nn.Module):
    """Asserts on tensor values, as models do to check their inputs (ProphetNet's shifted ids, I-BERT's
    NaN checks): a run that gets past the assertion has it hold."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        assert (x.abs() >= 0).all(), "negative magnitudes"
        assert torch.isnan(x).sum() == 0 and \
            x.isfinite().all().item()
        y = self.lin(x)
        return y if y.sum() > 0 else -y  # not an assert: False, the branch for False


def test_a_value_read_by_an_assert_holds():
    r = memtrace.report(ChecksItsInput(), (2, 8), device="cpu", optimizer="sgd")
    assert r.assumptions == (
        "The root module reads a value from tensor data (.item(), .tolist() or bool(tensor)) (6 calls): True "
        "(read by an assert, which holds in any run that gets past it)",
        "The root module reads a value from tensor data (.item(), .tolist() or bool(tensor)) (2 calls): False "
        "(assumed: fake tensors have no values; if it decides a size or a branch, give it with "
        "data_dependent={':item': ...})")


class CountedExperts(nn.Module):
    """Splits its tokens by the counts its router made, read with .tolist(), as JetMoE's experts do; the
    same counts split the output projection's input again."""

    def __init__(self, experts=4):
        super().__init__()
        self.router = nn.Linear(16, experts)
        self.up = nn.Parameter(torch.randn(experts, 16, 32) * 0.1)
        self.down = nn.Parameter(torch.randn(experts, 32, 16) * 0.1)

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        order = choice.argsort()
        counts = torch.bincount(choice, minlength=self.up.shape[0]).tolist()
        hidden = [p @ w for p, w in zip(x[order].split(counts), self.up)]
        out = torch.cat([h @ w for h, w in zip(torch.cat(hidden).split(counts), self.down)])
        return torch.zeros_like(x).index_add(0, order, out)


def test_counts_read_from_data_split_the_tokens_by_the_policy():
    if not symbolic_bincount():
        pytest.skip("this PyTorch cannot size bincount symbolically")
    r = memtrace.report(CountedExperts(), (64, 16), device="cpu", optimizer="sgd")
    # by default the first expert takes all 64 tokens: the largest a piece can be
    assert "split in the root module: output size 0 to 64 of at most 64 (8 calls) (upper bound)" in r.assumptions
    given = memtrace.report(CountedExperts(), (64, 16), device="cpu", optimizer="sgd",
                            data_dependent={":split": [16, 16, 16]})  # balanced: the last piece is what is left
    assert "split in the root module: output size 16 of at most 64 (8 calls) (given)" in given.assumptions
    with pytest.raises(memtrace.TraceError, match=r"sizes \[40, 40, 40\] over the 64 it splits"):
        memtrace.report(CountedExperts(), (64, 16), device="cpu", data_dependent={":split": 40})


def test_a_split_by_sizes_that_are_not_from_data_still_fails():
    class BadSplit(nn.Module):
        def forward(self, x):
            return torch.cat(x.split([1, 1]))

    with pytest.raises(memtrace.TraceError, match="at op aten.split_with_sizes.default: (RuntimeError|ValueError)"):
        memtrace.report(BadSplit(), (4, 2), device="cpu", train=False)


class Sampler(nn.Module):
    """Picks 16 positives and 48 negatives of 1,000 candidates into masks, as torchvision's balanced
    sampler does, and keeps the union: at most 64 places, whatever the values."""

    def forward(self, x):
        positive = torch.zeros(1000, dtype=torch.uint8)
        negative = torch.zeros(1000, dtype=torch.uint8)
        positive[torch.randperm(1000)[:16]] = 1
        negative[torch.randperm(1000)[:48]] = 1
        keep = torch.where(positive | negative)[0]
        return x[:, None] * keep.float()


def test_mask_counts_bound_nonzero():
    r = memtrace.report(Sampler(), (2,), device="cpu", train=False, steps=1)
    assert r.assumptions == ("nonzero in the root module: output size 64 of at most 64 (upper bound)",)


class CountsThenUnique(nn.Module):
    """Writes into a tensor of zeros in a way not followed: what was known of it is forgotten."""

    def forward(self, x):
        counts = torch.zeros(8, dtype=torch.long)
        view = counts.view(2, 4)
        view.index_add_(1, torch.tensor([0, 1]), torch.ones(2, 2, dtype=torch.long))  # through a view
        mask = torch.zeros(8, dtype=torch.bool)
        mask.view(2, 4)[0] = True  # a fill through a view
        return x * counts.unique().numel() * mask.nonzero().numel()


def test_writes_not_followed_leave_nothing_known():
    r = memtrace.report(CountsThenUnique(), (2,), device="cpu", train=False, steps=1)
    # unique of counts is not bounded by the zeros it started as, nor nonzero of the mask by its zero count
    assert r.assumptions == ("unique in the root module: output size 8 of at most 8 (upper bound)",
                             "nonzero in the root module: output size 8 of at most 8 (upper bound)")
