"""Video-to-video similarity of the fine-grained networks (fine students and ViSiL teacher).

All of them compare two indexed videos the same way: a region-level tensor dot reduced by
Chamfer similarity to a frame-to-frame matrix, the video comparator CNN, Hardtanh, and Chamfer
similarity over the frame axes. Only the indexing (attention, binarisation) and the scale of
the tensor dot differ, which subclasses provide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dns_milvus.errors import InvalidInputError
from dns_milvus.models._validate import VideoBatch, frame_matrix_batch, video_batch
from dns_milvus.models.layers import VideoComparator, frame_chamfer, region_chamfer
from dns_milvus.models.packed import packed_batch

#: Upper bound on the float elements of the largest intermediate of one chunk of pairs
#: (the region scores or the first comparator layer): 2**26 floats = 256 MiB.
DEFAULT_CHUNK_ELEMENTS = 2**26


def similarity_regularization(sim: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
    """Penalty on comparator outputs outside [-1, 1] (summed over each item's real cells): keeps
    the CNN's raw scores in the range Hardtanh passes through, so gradients do not vanish."""
    rows = torch.arange(sim.shape[1], device=sim.device)[None, :, None] < query_lengths[:, None, None]
    cols = torch.arange(sim.shape[2], device=sim.device)[None, None, :] < target_lengths[:, None, None]
    excess = F.relu(-1.0 - sim) + F.relu(sim - 1.0)
    return excess.masked_fill(~(rows & cols), 0.0).sum()


class FineSimilarityNetwork(nn.Module):
    """Base of the networks that compare region tensors with the video comparator.

    Subclasses set ``dims`` and ``visil_head`` and implement ``_index`` and ``index_dims``;
    ``_f2f_scale`` scales the region tensor dot (1 / bits for binary codes).
    """

    dims: int  # dimensions of the input region features
    visil_head: VideoComparator
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    def __init__(self) -> None:
        super().__init__()
        self.htanh = nn.Hardtanh()

    # -- to be provided by subclasses ----------------------------------------------------------

    @property
    def index_dims(self) -> int:
        """Last dimension of the indexed tensors (``index_video`` outputs)."""
        raise NotImplementedError

    @property
    def _f2f_scale(self) -> float:
        return 1.0

    def _index(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -- indexing ------------------------------------------------------------------------------

    def index_video(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Region features ``[T, R, dims]`` or ``[B, T, R, dims]`` (frame mask ``[T]``/``[B, T]``)
        -> indexed tensor of the same shape with last dimension ``index_dims``; padded frames
        are zero."""
        batch = video_batch(x, mask, dim=self.dims, like=self.visil_head.conv1.weight)
        out = self._index(batch.features)
        if batch.padded:
            out = out.masked_fill(~batch.mask[:, :, None, None], 0.0)
        return batch.unbatch(out)

    def index_packed(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Packed region features ``[N, R, dims]`` of videos with ``lengths`` ``[B]`` (see
        :mod:`dns_milvus.models.packed`) -> packed indexed tensor ``[N, R, index_dims]``."""
        x, _ = packed_batch(x, lengths, dim=self.dims, like=self.visil_head.conv1.weight)
        return self._index(x)

    def _indexed(self, x: Tensor, mask: Tensor | None, what: str) -> VideoBatch:
        return video_batch(x, mask, dim=self.index_dims, like=self.visil_head.conv1.weight, what=what)

    # -- frame-to-frame similarity -------------------------------------------------------------

    def _all_pairs_f2f(self, query: Tensor, target: Tensor) -> Tensor:
        """[Bq, Tq, R, C] x [Bt, Tt, R, C] -> [Bq, Bt, Tq, Tt] (no masking)."""
        bq, tq, r, c = query.shape
        bt, tt, r2, _ = target.shape
        scores = query.reshape(-1, c) @ target.reshape(-1, c).T
        # all target frames as one axis: [Bq, Tq, R, Bt*Tt, R] -> [Bq, Tq, Bt*Tt] -> [Bq, Bt, Tq, Tt]
        sim = region_chamfer(scores.view(bq, tq, r, bt * tt, r2)).view(bq, tq, bt, tt).transpose(1, 2)
        return sim * self._f2f_scale if self._f2f_scale != 1.0 else sim

    def _paired_f2f(self, query: Tensor, target: Tensor) -> Tensor:
        """[N, Tq, R, C] x [N, Tt, R, C] -> [N, Tq, Tt]: the i-th query with the i-th target."""
        n, tq, r, c = query.shape
        tt, r2 = target.shape[1], target.shape[2]
        scores = torch.bmm(query.reshape(n, tq * r, c), target.reshape(n, tt * r2, c).transpose(1, 2))
        sim = region_chamfer(scores.view(n, tq, r, tt, r2))
        return sim * self._f2f_scale if self._f2f_scale != 1.0 else sim

    def frame_to_frame_similarity(
        self,
        query: Tensor,
        target: Tensor,
        query_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> Tensor:
        """Frame-to-frame similarity of every query with every target.

        ``query`` [Bq, Tq, R, C] and ``target`` [Bt, Tt, R, C] are indexed tensors (C =
        ``index_dims``); returns [Bq, Bt, Tq, Tt]: region tensor dot, max over target regions,
        mean over query regions (divided by the number of bits for binary codes). Cells of
        padded frames are zero.
        """
        q = self._indexed(query, query_mask, "indexed query tensors")
        t = self._indexed(target, target_mask, "indexed target tensors")
        sim = self._all_pairs_f2f(q.features, t.features)
        cells = q.mask[:, None, :, None] & t.mask[None, :, None, :]
        return sim.masked_fill(~cells, 0.0)

    # -- video-to-video similarity -------------------------------------------------------------

    def similarity_from_frame_matrix(
        self, f2f: Tensor, query_lengths: Tensor | None = None, target_lengths: Tensor | None = None
    ) -> Tensor:
        """Video similarity of pairs from their frame-to-frame matrices.

        ``f2f`` [N, Tq, Tt] with real sizes ``query_lengths``/``target_lengths`` [N] (whole axes
        when omitted) -> [N] in [-1, 1]: video comparator, Hardtanh, then Chamfer similarity over
        the real frames (max over target frames, mean over query frames). Each pair's result is
        independent of the others and of the padding.
        """
        f2f, ql, tl = frame_matrix_batch(
            f2f, query_lengths, target_lengths, like=self.visil_head.conv1.weight
        )
        return self._similarity_from_f2f(f2f, ql, tl)

    def _similarity_from_f2f(self, f2f: Tensor, query_lengths: Tensor, target_lengths: Tensor) -> Tensor:
        sim, ql, tl = self.visil_head.compare(f2f, query_lengths, target_lengths)
        return frame_chamfer(self.htanh(sim), ql, tl)

    def calculate_video_similarity(
        self,
        query: Tensor,
        target: Tensor,
        query_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> Tensor:
        """Similarity of every query video with every target video, in [-1, 1].

        ``query`` [Bq, Tq, R, C] or [Tq, R, C] and ``target`` [Bt, Tt, R, C] or [Tt, R, C] are
        indexed tensors (outputs of :meth:`index_video`) with optional frame masks. Returns
        [Bq, Bt]; an unbatched side drops its axis ([Bt], [Bq] or a scalar). Pairs are processed in
        chunks of at most ``chunk_elements`` floats of intermediate data, targets grouped by
        length so that little padding is computed.
        """
        q = self._indexed(query, query_mask, "indexed query tensors")
        t = self._indexed(target, target_mask, "indexed target tensors")
        out = self._all_pairs_similarity(q, t)
        if not t.batched:
            out = out[:, 0]
        return out[0] if not q.batched else out

    def _all_pairs_similarity(self, q: VideoBatch, t: VideoBatch) -> Tensor:
        bq, bt = q.features.shape[0], t.features.shape[0]
        tq = int(q.lengths.max())
        query = q.features[:, :tq]
        # Targets in order of length, so that each chunk is cut to its own longest video.
        lengths = t.lengths.tolist()
        order = sorted(range(bt), key=lengths.__getitem__)
        # the larger of the region scores and the first comparator layer (32 channels)
        floats_per_frame_pair = bq * tq * max(q.features.shape[2] * t.features.shape[2], 32)
        runs = _chunks([lengths[i] for i in order], floats_per_frame_pair, self.chunk_elements)
        if len(runs) == 1:  # one chunk: no need to gather the targets in length order
            return self._similarity_block(query, q.lengths, t.features[:, : max(lengths)], t.lengths)
        out = torch.empty(bq, bt, dtype=query.dtype, device=query.device)
        for start, stop in runs:
            idx = torch.tensor(order[start:stop], device=query.device)
            tt = lengths[order[stop - 1]]
            out[:, idx] = self._similarity_block(query, q.lengths, t.features[idx, :tt], t.lengths[idx])
        return out

    def _similarity_block(
        self, query: Tensor, query_lengths: Tensor, target: Tensor, target_lengths: Tensor
    ) -> Tensor:
        """Every query [Bq, Tq, R, C] with every target [n, Tt, R, C] -> [Bq, n]."""
        bq, n = query.shape[0], target.shape[0]
        f2f = self._all_pairs_f2f(query, target)  # [Bq, n, Tq, Tt]
        ql = query_lengths[:, None].expand(bq, n).reshape(-1)
        tl = target_lengths[None, :].expand(bq, n).reshape(-1)
        return self._similarity_from_f2f(f2f.reshape(bq * n, *f2f.shape[2:]), ql, tl).view(bq, n)

    def forward(
        self,
        query: Tensor,
        target: Tensor,
        query_mask: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Similarity of aligned pairs for training: the i-th query with the i-th target.

        ``query`` [N, Tq, R, C] and ``target`` [N, Tt, R, C] are indexed tensors. Returns
        (similarities [N], similarity regularisation loss: the sum over real cells of the
        comparator outputs' distance outside [-1, 1]).
        """
        q = self._indexed(query, query_mask, "indexed query tensors")
        t = self._indexed(target, target_mask, "indexed target tensors")
        if q.features.shape[0] != t.features.shape[0]:
            raise InvalidInputError(
                "expected as many query as target videos for aligned pairs [N, ...], "
                f"got {q.features.shape[0]} and {t.features.shape[0]}"
            )
        f2f = self._paired_f2f(q.features, t.features)
        sim, ql, tl = self.visil_head.compare(f2f, q.lengths, t.lengths)
        loss = similarity_regularization(sim, ql, tl)
        return frame_chamfer(self.htanh(sim), ql, tl), loss


def _chunks(sorted_lengths: list[int], floats_per_frame_pair: int, budget: int) -> list[tuple[int, int]]:
    """Split targets sorted by length into runs [start, stop) whose largest intermediate
    (run size x longest length x floats a frame pair) stays within ``budget`` floats."""
    runs = []
    start, n = 0, len(sorted_lengths)
    while start < n:
        stop = start + 1
        while stop < n and (stop + 1 - start) * sorted_lengths[stop] * floats_per_frame_pair <= budget:
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs
