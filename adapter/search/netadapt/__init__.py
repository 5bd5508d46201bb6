"""NetAdapt (Yang et al., ECCV 2018): prune filters until a LUT says the latency budget is met.

Each iteration lowers the latency target, target = current − Δ·decay^(i−1) (never below
the budget), and makes one proposal per prunable channel group: the largest channel count
on the step grid whose LUT-estimated model latency meets the target (groups that cannot
reach it are skipped), keeping the filters of largest L2 norm (summed over a tied group).
Every proposal is short-term fine-tuned and scored on a holdout split carved out of the
training data; the best one (highest holdout accuracy, or least accuracy lost per
millisecond saved) becomes the next iteration's model. The loop ends when the estimate
meets the budget; `long_term_finetune` then trains the result for a few epochs.

The LUT's estimate of a whole model is off by a few percent, and not by the same amount on
every model. A relative budget is therefore a ratio in the LUT's terms too (`Budget.lut_ms`:
that fraction of the original's estimate; an absolute one is scaled by the original's
estimate over its measurement). With a device, when the estimate meets the budget the
search measures its model interleaved with the original (`measure`: the measured
fraction); over the budget (+`OVER_BUDGET_TOLERANCE`), the budget in the LUT's terms is
scaled by requested / measured and the search goes on (at most `MAX_RECALIBRATIONS`
times); far under it (`OVER_PRUNED`), the search pruned more than asked, and the
least-pruned saved iteration that still meets the budget is handed back instead.

Per iteration, `out_dir` gets `iter_NNN.keras` (the chosen model), a row of
`history.csv` and the rows of `proposals.csv`; `run_netadapt(..., resume=True)` carries
on after the last completed iteration. Iteration 0 is the original model.

Cost: estimating a proposal needs no model. The specs of the current model are found
once per iteration, and for each group the specs its channel count changes (their channel
fields are affine in the count), so a candidate count costs a few LUT look-ups.
Proposals are fine-tuned by `adapter.training.flex.FlexTrainer` on physically sliced weights
(`adapter.pruning.surgery.pruned_weights`), with one traced training step for the whole run;
only the chosen proposal is rebuilt as a Keras model (`adapter.pruning.surgery.prune`). Models
with layers `FlexTrainer` does not know are pruned and trained with Keras for every
proposal (slower, same result).
"""

from __future__ import annotations

from adapter.search.netadapt.config import HOLDOUT_SIZE, SELECTION_RULES, NetAdaptConfig
from adapter.search.netadapt.history import (
    HISTORY_FILE,
    PROPOSALS_FILE,
    STATE_FILE,
    IterationRecord,
    iteration_model_path,
    read_history,
    read_state,
)
from adapter.search.netadapt.proposals import Proposal, ProposalResult
from adapter.search.netadapt.search import (
    NetAdaptResult,
    NetAdaptRun,
    SearchStopped,
    long_term_finetune,
    prepare_run,
    run_iteration,
    run_netadapt,
)

__all__ = [
    "HISTORY_FILE",
    "HOLDOUT_SIZE",
    "PROPOSALS_FILE",
    "SELECTION_RULES",
    "STATE_FILE",
    "IterationRecord",
    "NetAdaptConfig",
    "NetAdaptResult",
    "NetAdaptRun",
    "Proposal",
    "ProposalResult",
    "SearchStopped",
    "iteration_model_path",
    "long_term_finetune",
    "prepare_run",
    "read_history",
    "read_state",
    "run_iteration",
    "run_netadapt",
]
