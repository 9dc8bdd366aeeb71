"""SReT: the Sliced Recursive Transformer, assembled from `vitblocks.layers`.

A conv stem (stride 8) and a learnable position map feed three stages of weight-shared
transformer blocks, joined by strided depthwise-conv pooling (PiT-style), then global
average pooling, LayerNorm and a linear classifier. Each stage holds a few unique blocks;
each is applied `loops` times, every application followed by a NonLinearMix layer, and
its attention is sliced into a per-loop number of token groups.

The registered variants (`timm.create_model("sret_t")` after `import vitblocks`) are in
`vitblocks.models.sret_variants`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.models._features import feature_take_indices
from torch import nn

from vitblocks.layers import ConvPool, ConvStem, PositionMap
from vitblocks.layers.depth import set_layer_loops
from vitblocks.layers.early_exit import EarlyExit, check_exit_options
from vitblocks.layers.modes import CheckpointSetting, MixMode
from vitblocks.layers.routing import check_routing_options
from vitblocks.layers.schedule import GroupSchedule
from vitblocks.layers.sharing import Sharing
from vitblocks.layers.stem import downsampled_size
from vitblocks.models.sret_stage import SReTStage

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def _per_stage(value: Any, num_stages: int, name: str) -> tuple:
    """Broadcast a scalar to every stage, or check that a sequence has one entry per stage."""
    if isinstance(value, (int, float)):
        return (value,) * num_stages
    value = tuple(value)
    if len(value) != num_stages:
        raise ValueError(f"{name} needs one entry per stage ({num_stages}), got {value!r}")
    return value


def stage_grids(img_size: tuple[int, int], num_stages: int) -> list[tuple[int, int]]:
    """Token-map size of each stage (stride-8 stem, then halved per stage, rounding up).

    Stage 0's grid is also the grid the position map is stored at.

    Args:
        img_size: Input height and width.
        num_stages: Number of stages.

    Returns:
        (height, width) of every stage's map.
    """
    grids = [downsampled_size(img_size, ConvStem.stride)]
    for _ in range(num_stages - 1):
        grids.append(downsampled_size(grids[-1], 2))
    return grids


def official_drop_path_rates(
    drop_path_rate: float, unique_blocks: Sequence[int], loops: Sequence[int]
) -> list[list[float]]:
    """Per-block drop-path rates as the paper's code assigns them.

    The rate grows linearly over all block applications ("virtual layers"), but stage s's
    unique blocks take the first values of that stage's slice, and every loop of a block
    uses the block's rate.

    Args:
        drop_path_rate: The largest rate of the linear ramp.
        unique_blocks: Unique blocks per stage.
        loops: Applications of each block, per stage.

    Returns:
        One list of rates per stage, one rate per unique block.
    """
    depths = [u * n for u, n in zip(unique_blocks, loops)]
    total = sum(depths)
    rates, start = [], 0
    for unique, depth in zip(unique_blocks, depths):
        rates.append([drop_path_rate * (start + i) / total for i in range(unique)])
        start += depth
    return rates


class SReT(nn.Module):
    """Sliced Recursive Transformer.

    Args:
        img_size: Input resolution the position map is stored at (stride-8 grid).
        in_chans: Image channels.
        num_classes: Classifier outputs; 0 for no classifier.
        global_pool: "avg" (the paper) or "" (forward_head returns the normed map).
        embed_dims: Channels per stage.
        num_heads: Heads per stage.
        unique_blocks: Blocks with their own weights, per stage.
        loops: Applications of each block: one int, or one per stage. The paper uses 2;
            raise it for very deep recursion (1000 applications fit in ~5M params with
            `mix="shared"`).
        groups: Group schedule per stage, e.g. `((8, 2), (4, 1), (1, 1))`: stage s
            slices loop l into `groups[s][l]` groups (the last entry repeats); one
            schedule such as `(4, 2)` or one int applies to every stage (see
            `GroupSchedule.per_stage`).
        mlp_ratio: Block MLP width ratio.
        mix: "per_loop" (the paper), "shared" or "none" — see `SReTStage`.
        share: Sharing schedule of every stage: "consecutive" (the paper: each block's
            loops in a row), "cycle" (the stage's blocks in turn, `loops` times), or one
            explicit assignment per stage (see `vitblocks.layers.sharing`).
        mix_mlp_ratio: NonLinearMix MLP width ratio.
        drop_rate: Dropout in the blocks, the mix layers and before the classifier.
        pos_drop_rate: Dropout after adding the position map.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth, spread over blocks as in the paper's code.
        permutation: Token permutation policy of later loops in training: "random"
            (drawn on the input's device, the default), "random_cpu" (drawn on the CPU
            generator: the official code's permutations exactly), "fixed" or "none".
        eval_permutation: Policy in eval mode: "fixed" (deterministic, the default),
            "none", "random", or "official" (= "random_cpu") to draw a fresh
            `torch.randperm` per call on the CPU generator as the paper's code does at eval.
        backend: Attention backend for every block, or None for the global choice.
        grad_checkpointing: Activation checkpointing mode of every recursive block
            (False, True / "loop", or "sqrt"); see `Recursive`.
        early_exit: Early exit of whole images in the last stage (`vitblocks.layers.EarlyExit`
            options): after chosen block applications (`after`, default every one but the
            last) the model's head scores each image, and at inference one whose top
            probability reaches `threshold` stops (`vitblocks.layers.set_exit_threshold`,
            `vitblocks.eval --exit-threshold`); in training each exit's loss is added with
            `weight` shared among them. None: no exits.
        routing: Token routing of every shared block (`vitblocks.layers.TokenRouting`):
            `{"capacity": 0.5}` updates half of a stage's tokens on each loop after the
            first. Routed loops need one group (`groups=((8, 1), (4, 1), (1, 1))`). None:
            every token takes every loop.
        device: Where the parameters live.
        dtype: Dtype of the parameters.
        attn_backend: Former name of `backend`; deprecated.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (64, 128, 256),
        num_heads: Sequence[int] = (2, 4, 8),
        unique_blocks: Sequence[int] = (2, 5, 3),
        loops: int | Sequence[int] = 2,
        groups: Sequence[Sequence[int]] = ((8, 2), (4, 1), (1, 1)),
        mlp_ratio: float = 3.6,
        mix: MixMode | str = MixMode.PER_LOOP,
        mix_mlp_ratio: float = 1.0,
        share: Sharing | Sequence[Sequence[int]] = "consecutive",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        permutation: str = "random",
        eval_permutation: str = "fixed",
        backend: str | None = None,
        grad_checkpointing: CheckpointSetting = False,
        routing: dict[str, Any] | None = None,
        early_exit: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        _check_global_pool(global_pool)
        check_routing_options(routing)
        check_exit_options(early_exit)
        if isinstance(img_size, bool) or not (isinstance(img_size, int) or (
                isinstance(img_size, Sequence) and len(img_size) == 2 and all(isinstance(s, int) for s in img_size))):
            raise TypeError(f"img_size={img_size!r} must be an int or a (height, width) pair of ints")
        if min((img_size,) if isinstance(img_size, int) else img_size) < 1:
            raise ValueError(f"img_size={img_size!r} must be positive")
        for name, value in (("loops", loops), ("unique_blocks", unique_blocks)):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                   for v in ((value,) if isinstance(value, int) else value)):
                raise ValueError(f"{name}={value!r}: every entry must be an int >= 1")
        if attn_backend is not None:
            warnings.warn("SReT(attn_backend=...) is now SReT(backend=...)", FutureWarning, stacklevel=2)
            backend = backend if backend is not None else attn_backend
        dd = {"device": device, "dtype": dtype}
        num_stages = len(embed_dims)
        num_heads = _per_stage(num_heads, num_stages, "num_heads")
        unique_blocks = _per_stage(unique_blocks, num_stages, "unique_blocks")
        loops = _per_stage(loops, num_stages, "loops")
        schedules = GroupSchedule.per_stage(groups, num_stages)
        shares = (share,) * num_stages if isinstance(share, str) else tuple(share)
        if len(shares) != num_stages:
            raise ValueError(f"share: give a schedule name or one assignment per stage ({num_stages}), got {share!r}")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)

        _check_num_classes(num_classes)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.img_size = img_size
        self.num_features = self.head_hidden_size = embed_dims[-1]

        self.patch_embed = ConvStem(in_chans, embed_dims[0], **dd)
        self.pos_embed = PositionMap(embed_dims[0], stage_grids(img_size, 1)[0], **dd)
        self.pos_drop = nn.Dropout(pos_drop_rate)

        block_kwargs = dict(
            proj_drop=drop_rate, attn_drop=attn_drop_rate, permutation=permutation,
            eval_permutation=eval_permutation, backend=backend, norm_layer=_LayerNorm,
        )
        rates = official_drop_path_rates(drop_path_rate, unique_blocks, loops)
        stages, self.feature_info = [], []
        reduction = ConvStem.stride
        for s in range(num_stages):
            downsample = None if s == 0 else ConvPool(embed_dims[s - 1], embed_dims[s], **dd)
            reduction *= 1 if s == 0 else 2
            stages.append(
                SReTStage(
                    dim=embed_dims[s], num_heads=num_heads[s], unique_blocks=unique_blocks[s], loops=loops[s],
                    groups=schedules[s], mlp_ratio=mlp_ratio, mix=mix, mix_mlp_ratio=mix_mlp_ratio,
                    drop_path_rates=rates[s], share=shares[s], downsample=downsample, block_kwargs=block_kwargs,
                    routing=routing, seed=100 * s, **dd,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[s], reduction=reduction, module=f"stages.{s}"))
        self.stages = nn.ModuleList(stages)
        self.norm = _LayerNorm(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.early_exit = None if early_exit is None else EarlyExit(**early_exit)
        if self.early_exit is not None and num_classes == 0:
            raise ValueError("early_exit needs a classifier to score the images at each exit: give num_classes > 0")
        if self.early_exit is not None:
            self.early_exit.exits(sum(layer.positions for layer in self.stages[-1].blocks))  # refuses a bad position

        self._check_image_size(img_size)
        self.apply(self._init_layer_norm)
        self.set_grad_checkpointing(grad_checkpointing)

    @staticmethod
    def _init_layer_norm(module: nn.Module) -> None:
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _check_image_size(self, img_size: tuple[int, int]) -> None:
        for s, (stage, grid) in enumerate(zip(self.stages, stage_grids(img_size, len(self.stages)))):
            try:
                stage.check_grid(*grid, where=f"stage {s + 1}'s ")
            except ValueError as error:
                raise ValueError(f"img_size={img_size} is too small: {error}") from None

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides 1-D parameters and biases.

        Returns:
            Parameter names.
        """
        return {"pos_embed.weight"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes that group parameters by depth, for layer-wise learning-rate decay.

        Args:
            coarse: One group per stage instead of one per block.

        Returns:
            timm's group-matcher dict.
        """
        return dict(
            stem=r"^patch_embed|^pos_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: CheckpointSetting = True) -> None:
        """Checkpoint activations in every recursive block.

        Args:
            enable: False, True / "loop", or "sqrt" (see `Recursive`).
        """
        self.grad_checkpointing = enable
        for stage in self.stages:
            for block in stage.blocks:
                block.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def set_loops(self, loops: int) -> None:
        """Test-time depth: apply every shared block `loops` times (see `vitblocks.layers.set_loops`).

        The image size is checked against the group schedule again (more loops may use
        a later, larger group count).

        Args:
            loops: Loops per block (cycles for cycle-scheduled stages), >= 1.

        Raises:
            ValueError: If `loops` is invalid or the image size no longer fits the group
                schedule.
        """
        set_layer_loops(self, loops)
        self._check_image_size(self.img_size)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head.

        Returns:
            The head module.
        """
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier and optionally the pooling.

        Args:
            num_classes: New class count; 0 for no classifier (identity).
            global_pool: "avg" or "", or None to keep the current pooling.

        Raises:
            ValueError: For an unsupported pooling or a negative class count.
        """
        _check_num_classes(num_classes)
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        weight = next(self.parameters())  # the new head is made where (and in the dtype that) the model lives
        self.head = (nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
                     if num_classes > 0 else nn.Identity())

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.pos_embed(self.patch_embed(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Run the stem and every stage.

        Args:
            x: Images (B, 3, H, W).

        Returns:
            The last stage's map (B, C, H/32, W/32).
        """
        x = self._stem(x)
        for stage in self.stages[:-1]:
            x = stage(x)
        if self.early_exit is None:
            return self.stages[-1](x)
        return self.stages[-1](x, early_exit=self.early_exit, head=self.forward_head)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalize and classify.

        Args:
            x: A map from `forward_features`.
            pre_logits: Return the normalized pooled features instead of logits.

        Returns:
            Logits (B, num_classes), or features.
        """
        if self.global_pool == "avg":
            # the mean over tokens laid out as the stages hold them (B, H*W, C): its gradient then comes
            # back in that layout, and the stage's backward runs on contiguous tensors
            x = x.flatten(2).transpose(1, 2).mean(1)
            x = self.norm(x)
        else:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images to logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage output maps, timm style.

        Args:
            x: Images.
            indices: Stages to return: the last n if an int, all if None, or a list.
            norm: Unused (SReT normalizes only the pooled vector); kept for timm's API.
            stop_early: Stop after the last requested stage.
            output_fmt: Only "NCHW".
            intermediates_only: Return only the stage maps.

        Returns:
            The stage maps, or (last stage's map, stage maps).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: SReT returns NCHW maps only")
        take, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self._stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head) not needed for some stage maps.

        Args:
            indices: Stage maps to keep: the last n, or a list.
            prune_norm: Drop the final norm.
            prune_head: Drop the classifier.

        Returns:
            The absolute indices kept.
        """
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool={global_pool!r}: SReT supports 'avg' or ''")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 0:  # timm's models turn any count below 1 into a silent identity head
        raise ValueError(f"num_classes={num_classes}: give the number of classes, or 0 for no classifier")
