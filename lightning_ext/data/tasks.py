"""Task streams for continual learning: class-incremental splits, a datamodule that walks through
tasks at epoch boundaries, and a small experience-replay memory.

Everything random here is drawn from seeded generators, so a resumed run sees the same tasks, the
same memory and the same replay pairing as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from lightning_ext._sized import dataset_size

__all__ = ["ReplayMemory", "TaskStream", "WithReplay", "dataset_targets", "split_by_classes"]


def dataset_targets(dataset: Dataset) -> Tensor:
    """Integer labels of a dataset of ``(x, y)`` items (fast for TensorDataset and Subset).

    Args:
        dataset: a dataset of ``(x, y)`` items; other datasets are read item by item.

    Returns:
        The labels in index order.

    Examples:
        >>> import torch
        >>> from torch.utils.data import Subset, TensorDataset
        >>> data = TensorDataset(torch.zeros(3, 2), torch.tensor([2, 0, 1]))
        >>> dataset_targets(Subset(data, [2, 0]))
        tensor([1, 2])
    """
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return torch.as_tensor([int(dataset[i][1]) for i in range(dataset_size(dataset))])


def split_by_classes(
    dataset: Dataset, classes_per_task: int = 2, class_order: Sequence[int] | None = None
) -> list[Subset]:
    """Class-incremental split: task ``t`` holds the classes ``order[t*c:(t+1)*c]``.

    Args:
        dataset: a dataset of ``(x, y)`` items with integer labels.
        classes_per_task: the classes of each task (``c``).
        class_order: the classes in task order (None: ascending).

    Returns:
        One ``Subset`` per task.

    Raises:
        ValueError: ``classes_per_task`` below 1, or a number of classes that is not a multiple
            of it.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.zeros(6, 2), torch.tensor([0, 1, 2, 3, 0, 1]))
        >>> [len(task) for task in split_by_classes(data, classes_per_task=2)]
        [4, 2]
    """
    if classes_per_task < 1:
        raise ValueError(f"classes_per_task must be >= 1, got {classes_per_task}")
    targets = dataset_targets(dataset)
    order = list(class_order) if class_order is not None else sorted(set(targets.tolist()))
    if len(order) % classes_per_task:
        raise ValueError(
            f"{len(order)} classes do not divide into tasks of {classes_per_task}: "
            "pass class_order with a multiple of classes_per_task classes"
        )
    tasks = []
    for start in range(0, len(order), classes_per_task):
        mask = torch.isin(targets, torch.as_tensor(order[start : start + classes_per_task]))
        indices = mask.nonzero().flatten().tolist()
        if not indices:
            raise ValueError(f"classes {order[start : start + classes_per_task]} have no samples")
        tasks.append(Subset(dataset, indices))
    return tasks


class ReplayMemory(Dataset):
    """A fixed-capacity memory split equally between the tasks seen so far.

    ``add_task`` draws the new task's share with a generator seeded by ``(seed, task)`` and shrinks
    the older shares to keep the total at ``capacity`` (as in class-balanced experience replay).

    Args:
        capacity: the number of samples kept over all tasks.
        seed: seeds the draw of each task's share.

    Raises:
        ValueError: ``capacity`` below 1.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> memory = ReplayMemory(capacity=4)
        >>> memory.add_task(TensorDataset(torch.arange(10.0), torch.zeros(10)))
        >>> memory.add_task(TensorDataset(torch.arange(10.0), torch.ones(10)))
        >>> len(memory), sorted(int(memory[i][1]) for i in range(len(memory)))
        (4, [0, 0, 1, 1])
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self._per_task: list[tuple[Dataset, Tensor]] = []
        self._flat: list[tuple[int, int]] = []

    def add_task(self, dataset: Dataset) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._per_task))
        self._per_task.append((dataset, torch.randperm(dataset_size(dataset), generator=g)))
        quota = self.capacity // len(self._per_task)
        self._flat = [
            (t, int(i)) for t, (_, order) in enumerate(self._per_task) for i in order[:quota]
        ]

    @property
    def num_tasks(self) -> int:
        return len(self._per_task)

    def __len__(self) -> int:
        return len(self._flat)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        task, i = self._flat[index]
        return self._per_task[task][0][i]


class WithReplay(Dataset):
    """Pairs each new sample with one replayed sample: items are ``(x, y, x_replay, y_replay)``.

    The pairing is drawn once from ``seed``; a batch of these is a new batch plus an equally large
    replay batch, which is how the stability-gap paper runs ER.

    Args:
        dataset: the new task's training data, items ``(x, y)``.
        memory: the replay memory of the earlier tasks.
        seed: seeds the pairing.

    Raises:
        ValueError: an empty ``memory``.

    Examples:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> memory = ReplayMemory(capacity=2)
        >>> memory.add_task(TensorDataset(torch.zeros(5, 3), torch.zeros(5)))
        >>> paired = WithReplay(TensorDataset(torch.ones(6, 3), torch.ones(6)), memory)
        >>> len(paired), len(paired[0])
        (6, 4)
    """

    def __init__(self, dataset: Dataset, memory: ReplayMemory, seed: int = 0) -> None:
        if len(memory) == 0:
            raise ValueError("the replay memory is empty: add a task to it first")
        self.dataset, self.memory = dataset, memory
        g = torch.Generator().manual_seed(seed)
        self.pairing = torch.randint(len(memory), (dataset_size(dataset),), generator=g)

    def __len__(self) -> int:
        return dataset_size(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        x, y = self.dataset[index]
        xr, yr = self.memory[int(self.pairing[index])]
        return x, y, xr, yr


class TaskStream(pl.LightningDataModule):
    """One ``trainer.fit`` that walks through tasks: task ``epoch // epochs_per_task``.

    Needs ``Trainer(reload_dataloaders_every_n_epochs=epochs_per_task)`` so that Lightning asks for
    the next task's loader at each boundary (ContinualEvaluation checks this at setup). With
    ``replay_capacity > 0`` the loaders of tasks after the first yield ``WithReplay`` items drawn
    from a memory of all earlier tasks. ``task_eval_datasets()`` gives the per-task evaluation
    sets that ContinualEvaluation reads when it is given none.

    It is a ``lightning.pytorch`` datamodule: a ``pytorch_lightning`` Trainer refuses it (its
    hook checks compare against its own class); there, give loaders to one fit per task.

    Args:
        train_tasks: one training dataset per task, items ``(x, y)``.
        eval_tasks: one evaluation dataset per task (None: ContinualEvaluation needs its own).
        epochs_per_task: training epochs of each task.
        batch_size: the training batch size.
        replay_capacity: samples kept in the replay memory (0: no replay).
        seed: seeds the sampling order and the replay memory.

    Raises:
        ValueError: no train tasks, a number of eval tasks that differs, or ``epochs_per_task``
            below 1.

    Examples:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import TensorDataset
        >>> tasks = [TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(3)]
        >>> stream = TaskStream(tasks, tasks, epochs_per_task=2, batch_size=4)
        >>> stream.num_tasks
        3
        >>> trainer = pl.Trainer(max_epochs=6, reload_dataloaders_every_n_epochs=2, logger=False)
    """

    def __init__(
        self,
        train_tasks: Sequence[Dataset],
        eval_tasks: Sequence[Dataset] | None = None,
        *,
        epochs_per_task: int = 1,
        batch_size: int = 64,
        replay_capacity: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train_tasks:
            raise ValueError("train_tasks is empty: give one dataset per task")
        if eval_tasks is not None and len(eval_tasks) != len(train_tasks):
            raise ValueError(
                f"{len(train_tasks)} train tasks but {len(eval_tasks)} eval tasks: give one each"
            )
        if epochs_per_task < 1:
            raise ValueError(f"epochs_per_task must be >= 1, got {epochs_per_task}")
        self.train_tasks, self.eval_tasks = list(train_tasks), eval_tasks
        self.epochs_per_task, self.batch_size = epochs_per_task, batch_size
        self.replay_capacity, self.seed = replay_capacity, seed

    @property
    def num_tasks(self) -> int:
        return len(self.train_tasks)

    @property
    def current_task(self) -> int:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def task_eval_datasets(self) -> list[Dataset]:
        if self.eval_tasks is None:
            raise ValueError("this TaskStream was built without eval_tasks")
        return list(self.eval_tasks)

    def task_dataset(self, task: int) -> Dataset:
        """The training set of ``task``, paired with replay of tasks ``< task`` if asked."""
        dataset = self.train_tasks[task]
        if self.replay_capacity <= 0 or task == 0:
            return dataset
        memory = ReplayMemory(self.replay_capacity, seed=self.seed)
        for earlier in self.train_tasks[:task]:
            memory.add_task(earlier)
        return WithReplay(dataset, memory, seed=self.seed * 1_000_003 + task)

    def train_dataloader(self) -> DataLoader:
        dataset = self.task_dataset(self.current_task)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        # A seeded DistributedSampler (one replica when single-process) makes the order depend on
        # (seed, epoch) only: resumable bitwise, and Lightning keeps it as it is under DDP.
        sampler: DistributedSampler[int] = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
