"""The small contracts that reusable callbacks require of LightningModules.

A callback checks its protocol in ``setup()`` with :func:`require_protocol`, which names every missing
method. The callback owns the policy, schedule and state; the module owns the mechanism.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class SupportsTokenDropping(Protocol):
    """A ViT-based module that can compute on a shrinking subset of patch tokens.

    Used by ``callbacks.token_dropping.SparseTokenDropping``. Before each training step the callback
    reads :meth:`token_schedule_step` and, at a prune event ``t``, calls :meth:`prepare_token_drop`
    before step ``t - 1`` and :meth:`drop_patches` before step ``t``.
    """

    def token_schedule_step(self) -> int:
        """Index of the coming training step in the dropping schedule (restarts at 0 with new inputs)."""
        ...

    def token_schedule_length(self) -> int:
        """Steps per schedule (events at or beyond it never happen and are refused)."""
        ...

    def num_kept_patches(self) -> int:
        """Patch tokens (prefix tokens excluded) the module currently computes on; raises if it has none."""
        ...

    def prepare_token_drop(self) -> None:
        """The coming step precedes a drop: record patch scores (e.g. without augmentation)."""
        ...

    def drop_patches(self, keep: int) -> None:
        """From the coming step on, compute on only ``keep`` of the current patches."""
        ...


@runtime_checkable
class SupportsSampleWeighting(Protocol):
    """A module whose training loss weights each fine-tuning sample by an externally given weight.

    Used by ``callbacks.bayesian_weighting.BayesianDataScheduler``. Before each training step the
    callback reads :meth:`sample_weighting_batch` and calls :meth:`set_sample_weights`; after it, it
    reads :meth:`last_sample_losses` (or :meth:`recompute_sample_losses`). Without the callback every
    weight is 1.
    """

    def num_weighted_samples(self) -> int:
        """Size N of the fine-tuning set; dataset indices run over 0..N-1."""
        ...

    def sample_weighting_batch(self, batch: object) -> dict:
        """``index`` (B,) long, ``text`` list of B strings and ``source`` (B,) long or None (monitoring)."""
        ...

    def set_sample_weights(self, weights: object) -> None:
        """(B,) weights for the coming step's fine-tuning batch (None: all ones)."""
        ...

    def last_sample_losses(self) -> tuple:
        """(index (B,), losses (B,)) of the last step's fine-tuning batch, detached, before the update."""
        ...

    def recompute_sample_losses(self) -> object:
        """(B,) losses of the last fine-tuning batch under the current (updated) parameters."""
        ...

    def reference_sample_losses(self) -> object:
        """(B,) losses of the last fine-tuning batch under the safety-agnostic reference model."""
        ...


def require_protocol(obj: object, protocol: type, user: str) -> None:
    """Raise a TypeError naming the methods of ``protocol`` that ``obj`` lacks (for ``user``)."""
    if isinstance(obj, protocol):
        return
    wanted = [name for name in vars(protocol) if not name.startswith("_") and callable(getattr(protocol, name))]
    missing = [name for name in wanted if not callable(getattr(obj, name, None))]
    raise TypeError(
        f"{type(obj).__name__} must implement {protocol.__name__} to be used with {user}; "
        f"missing method(s): {', '.join(missing)}"
    )


@runtime_checkable
class TaskStream(Protocol):
    """A datamodule serving a sequence of tasks inside one ``fit``: task ``t`` during a range of epochs.

    Used by ``lit_modules.refresh.ContinualModule`` and ``callbacks.refresh.RefreshLearning`` (task ends).
    """

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during (0-based) ``epoch``; epochs past the stream belong to the last task."""
        ...

    def is_task_end(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last epoch of its task."""
        ...

    def task_classes(self) -> list[list[int]]:
        """Classes of each task, in stream order (global class ids)."""
        ...

    def train_set(self, task: int) -> object:
        """The training ``Dataset`` of ``task`` (Fisher estimates of a finished task)."""
        ...


@runtime_checkable
class SupportsRefresh(Protocol):
    """A module whose weights refresh learning can unlearn on the current batch.

    Used by ``callbacks.refresh.RefreshLearning``. Before each training step the callback takes the
    gradient of :meth:`refresh_loss` on the coming batch with respect to the parameters of
    :meth:`refresh_network` and moves them up that gradient; at task ends it estimates their Fisher on
    :meth:`fisher_examples` of the task's training set.
    """

    def refresh_network(self) -> object:
        """The ``nn.Module`` whose parameters are unlearned (and whose Fisher is estimated)."""
        ...

    def refresh_loss(self, batch: object, objective: bool) -> object:
        """Loss to unlearn on a device-side training batch: the current-task cross-entropy (``objective``
        False, the released code) or the whole training objective (True, the paper). It must not draw
        from the global RNG nor change state other than BatchNorm statistics (the callback restores them)."""
        ...

    def fisher_examples(self, batch: object) -> tuple:
        """``(inputs, labels)`` of a device-side loader batch as the network takes them, without augmentation."""
        ...


@runtime_checkable
class SupportsGradientAlignment(Protocol):
    """A multi-task module whose shared parameters are updated from several per-task losses.

    Used by ``callbacks.gradient_alignment.GradientAlignment``. The module trains in manual optimisation:
    at each update it asks its installed rule for a gradient dict,
    ``rule(loss_fn, params, n_tasks)`` with ``loss_fn(params, i)`` the functional loss of task ``i``,
    writes it into ``.grad`` and steps its optimiser. Without the callback the rule is the plain mean
    (``core.gradient_alignment.mean_gradient``).
    """

    def alignment_parameters(self) -> object:
        """The shared parameters the rule updates, as a name -> tensor dict."""
        ...

    def set_gradient_rule(self, rule: object) -> None:
        """Install ``rule(loss_fn, params, n_tasks) -> dict of gradients`` (``None``: the plain mean)."""
        ...
