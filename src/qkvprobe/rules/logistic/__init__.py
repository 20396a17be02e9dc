"""The hyperplane rule's solver: L2-penalised (multinomial) logistic regression, many problems at once, each
certified to be at its optimum or flagged.

Objective (scikit-learn's, so results are comparable): ``C · Σ_i sw_i · logloss_i + ½‖W‖²`` with the intercept
unpenalised; multinomial for K > 2 classes, binary (one weight vector) for K = 2, as
``sklearn.linear_model.LogisticRegression``. It is minimised divided by ``C · Σ sw`` (same optimum; gradient
scale independent of n).

Convergence is certified, not assumed (:mod:`.lbfgs`): a fit stops when ``‖∇f‖² / 2μ ≤ tol · f`` with μ the
penalty's strength, an upper bound of the distance to the optimum (for logistic regression it is the duality
gap of the residuals' dual point), so ``converged`` means the objective is within ``tol`` (relative) of its
minimum; scikit-learn's own rule (``max|∇f| ≤ tol``) can stop far from it at large C on raw features. Features
are raw (no standardisation), so problems can be very ill-conditioned: the solver's preconditioner is refreshed
with the loss's curvature at the current iterate while it runs (:mod:`.precondition`).

Modules: :mod:`.loss` (the loss of many problems, class weights), :mod:`.precondition`, the objectives
:mod:`.dense` (features in memory; several Cs per feature set), :mod:`.span` (few-shot problems in the span of
their rows) and :mod:`.streamed` (rows in chunks), the batched L-BFGS :mod:`.lbfgs`, and :mod:`.fit`, the one
fit API the rules and protocols use.
"""

from __future__ import annotations

from .dense import DenseLogistic
from .fit import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    GRID_BYTES,
    LogisticFit,
    fit_logistic,
    fit_logistic_grid,
    fit_logistic_path,
    grid_step,
    solve,
    solve_span,
)
from .lbfgs import HISTORY, REFRESH_EVERY, LbfgsResult, Objective, gap_bound, minimize_lbfgs
from .loss import (
    augment,
    balanced_class_weights,
    balanced_sample_weight,
    check_class_weight,
    default_dtype,
    logistic_sums,
    num_logits,
)
from .precondition import (
    CURVATURE_ROWS,
    PRECOND_ROWS,
    apply_preconditioner,
    class_curvature,
    curvature_preconditioner,
    curvature_stride,
    moment_preconditioner,
    second_moment,
)
from .span import SpanLogistic, SpanReduction, span_expand, span_reduce
from .streamed import Chunks, StreamedLogistic

__all__ = [
    "CURVATURE_ROWS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "GRID_BYTES",
    "HISTORY",
    "PRECOND_ROWS",
    "REFRESH_EVERY",
    "Chunks",
    "DenseLogistic",
    "LbfgsResult",
    "LogisticFit",
    "Objective",
    "SpanLogistic",
    "SpanReduction",
    "StreamedLogistic",
    "apply_preconditioner",
    "augment",
    "balanced_class_weights",
    "balanced_sample_weight",
    "check_class_weight",
    "class_curvature",
    "curvature_preconditioner",
    "curvature_stride",
    "default_dtype",
    "fit_logistic",
    "fit_logistic_grid",
    "fit_logistic_path",
    "gap_bound",
    "grid_step",
    "logistic_sums",
    "minimize_lbfgs",
    "moment_preconditioner",
    "num_logits",
    "second_moment",
    "solve",
    "solve_span",
    "span_expand",
    "span_reduce",
]
