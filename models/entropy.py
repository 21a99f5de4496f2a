"""Residual coding with integer probability tables and constriction's range coder.

A residual ``r`` at scale index ``j`` is split into a token and uniform low bits: ``q = r >> sh[j]``
(``sh`` keeps about 4-6 levels per scale unit in ``q``); ``q`` in ``[-C, C)`` is its own token,
anything beyond is an escape token followed by an Elias-gamma style class (token stream) and
its extra bits (uniform stream). Tables are integer frequencies stored with the model, so
every machine builds the very same coder.

Per slice there are two range-coded streams, both in wavefront order (see models.context):
- tokens: for each step, the step's tokens, then the escape classes of the step's escapes;
- uniform: for each step, the low bits of its symbols, then the extra bits of its escapes.

From blob format 5 on a token is coded in two stages, over three streams: the tokens stream
holds its first stage (``q`` in ``[-S, S)`` itself, or "beyond" on either side: 2S + 2
symbols), a tail stream, for each step, the second stage of the step's "beyond" tokens (which
token on that side, escapes included), then the escape classes. The code length is the same
(the stages' probabilities multiply to the token's), but the range coder's cost per symbol
grows with the row's width, and most symbols now take a row of 14 instead of 50.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

from models import kernels
from models.features import N_SCALES, SCALE_STEPS, SCALE_ZERO

TOKEN_RANGE = 24                    # C: q in [-C, C) coded directly
ESC_NEG = 2 * TOKEN_RANGE           # escape tokens
ESC_POS = ESC_NEG + 1
N_TOKENS = ESC_POS + 1
N_CLASSES = 24                      # escape magnitude classes: bit length of the overflow
CODE_CHUNK = 1 << 14                # symbols per coder call when encoding
STAGE_RANGE = 6                     # S: first-stage tokens q in [-S, S) (blob format 5 on)
STAGE_WIDTH = 2 * STAGE_RANGE + 2   # first-stage row: the direct tokens, beyond below, above
BEYOND = TOKEN_RANGE - STAGE_RANGE  # direct tokens on each side that the tail stream codes
TAIL_WIDTH = max(BEYOND + 1, N_CLASSES)   # tail rows: one side's tokens and escape, or classes

_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_UNIFORM = constriction.stream.model.Uniform()


def table_shifts(n_scales: int = N_SCALES) -> np.ndarray:
    """Low bits split off at each scale index: scales in [2.8, 5.7) * 2**sh keep sh bits."""
    j = np.arange(n_scales)
    return np.maximum((j - SCALE_ZERO + 2) // SCALE_STEPS - 2, 0).astype(np.int64)


SHIFTS = table_shifts()   # of the original layout: one row per scale index
FRACTION_BINS = (1, 4)   # table rows per scale index: one, or one per quarter of the mean's fraction


def row_shifts(fraction_bins: int = 1, flat: bool = True) -> np.ndarray:
    """Low bits split off at each row of a table layout: ``fraction_bins`` rows per scale
    index (row ``j * fraction_bins + bin``), then the flat-context row."""
    return np.append(np.repeat(table_shifts(), fraction_bins), [0] if flat else [])\
        .astype(np.int64)


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53 (0 for 0): frexp's exponent."""
    return np.frexp(np.asarray(v, dtype=np.float64))[1].astype(np.int64)


@dataclass
class Symbols:
    """A residual split into what the two streams carry, per voxel (same order as input)."""

    token: np.ndarray     # int64 token
    low: np.ndarray       # low bits value
    low_bits: np.ndarray  # number of low bits (0: none)
    cls: np.ndarray       # escape class (only where token is an escape)
    extra: np.ndarray     # escape extra bits value
    extra_bits: np.ndarray


def split_residuals(r: np.ndarray, j: np.ndarray, shifts: np.ndarray = SHIFTS) -> Symbols:
    """Tokens, low bits and escapes of residuals ``r`` at table rows ``j`` (``shifts``: low
    bits of each row, see :func:`row_shifts`)."""
    sh = shifts[j]
    q = r >> sh
    low = r - (q << sh)
    token = q + TOKEN_RANGE
    cls, extra, extra_bits = (np.zeros(len(token), np.int64) for _ in range(3))
    # escapes are rare (a few in 10^4 voxels): their fields are worked out on them alone
    far = np.flatnonzero((token < 0) | (token >= 2 * TOKEN_RANGE))
    if len(far):
        qf = q[far]
        up = qf >= TOKEN_RANGE
        e = np.where(up, qf - TOKEN_RANGE, -TOKEN_RANGE - 1 - qf)
        token[far] = np.where(up, ESC_POS, ESC_NEG)
        cls[far] = c = _bit_length(e)
        extra_bits[far] = b = np.maximum(c - 1, 0)
        extra[far] = e - np.where(c > 0, 1 << b, 0)
    return Symbols(token, low, sh, cls, extra, extra_bits)


def join_residuals(token, low, j, cls, extra, shifts: np.ndarray = SHIFTS):
    """Inverse of :func:`split_residuals` (escape fields read only where token escapes)."""
    sh = shifts[j]
    e = np.where(cls > 0, (1 << np.maximum(cls - 1, 0)) + extra, 0)
    q = np.where(token == ESC_POS, TOKEN_RANGE + e,
                 np.where(token == ESC_NEG, -TOKEN_RANGE - 1 - e, token - TOKEN_RANGE))
    return (q << sh) + low


@dataclass
class CodingTables:
    """Integer frequency tables: token rows (``fraction_bins`` per scale index, in
    :func:`row_shifts` order, then, for models with flat contexts, the flat row), and
    escape classes."""

    tokens: np.ndarray   # int64 (N_SCALES * fraction_bins [+ 1], N_TOKENS), all > 0
    classes: np.ndarray  # int64 (N_CLASSES,), all > 0

    def __post_init__(self):
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        self.classes = np.asarray(self.classes, dtype=np.int64)
        layouts = {N_SCALES * b + f: (b, bool(f)) for b in FRACTION_BINS for f in (0, 1)}
        if self.tokens.ndim != 2 or len(self.tokens) not in layouts \
                or self.tokens.shape[1] != N_TOKENS or self.classes.shape != (N_CLASSES,):
            raise ValueError("coding tables have the wrong shape")
        if (self.tokens <= 0).any() or (self.classes <= 0).any():
            raise ValueError("coding tables need positive frequencies")
        self.fraction_bins, self.flat = layouts[len(self.tokens)]
        self.flat_index = N_SCALES * self.fraction_bins   # the flat row, when there is one
        self.shifts = row_shifts(self.fraction_bins, self.flat)
        # one float table for the coder: a row per table row, then the escape classes
        # (padded with zeros, which constriction maps to its smallest probability)
        self.class_row = len(self.tokens)
        self._rows = np.zeros((self.class_row + 1, N_TOKENS), np.float64)
        self._rows[:self.class_row] = self.tokens
        self._rows[self.class_row, :N_CLASSES] = self.classes
        self.token_rows = self._rows[:self.class_row]     # (a view) the rows tokens use
        self.tail_classes = np.zeros(TAIL_WIDTH)           # the classes in the tail stream
        self.tail_classes[:N_CLASSES] = self.classes
        # prefix sums of each row's direct tokens (exact: integers), for the first stages
        self.token_cum = np.zeros((self.class_row, 2 * TOKEN_RANGE + 1))
        self.token_cum[:, 1:] = np.cumsum(self.tokens[:, :2 * TOKEN_RANGE], axis=1)

    def rows(self, index: np.ndarray) -> np.ndarray:
        """Probability rows for table indices (``class_row`` selects the escape classes)."""
        return np.take(self._rows, index, axis=0)

    def tail_rows(self, index: np.ndarray, qmin: np.ndarray, qmax: np.ndarray,
                  above: np.ndarray) -> np.ndarray:
        """Second-stage rows (:func:`tail_rows`) of symbols beyond their first stage at table
        rows ``index``, truncated to ``[qmin, qmax]``, ``above`` their side."""
        if kernels.available():
            return kernels.tail_rows(self.token_rows, TOKEN_RANGE, STAGE_RANGE, index, qmin, qmax,
                                     above, RANGE_EDGE, TAIL_WIDTH)
        return tail_rows(truncate_rows(self.rows(index), qmin, qmax), above)

    def bounded_rows(self, index: np.ndarray, qmin: np.ndarray, qmax: np.ndarray,
                     out: np.ndarray, stage: int = 0) -> np.ndarray:
        """:meth:`rows` truncated to the tokens ``[qmin, qmax]`` (:func:`truncate_rows`),
        written to ``out`` (at least ``len(index)`` rows) by the compiled kernel where it
        runs; with ``stage`` (:data:`STAGE_RANGE`) their first-stage rows (:func:`stage_rows`,
        ``out`` :data:`STAGE_WIDTH` wide)."""
        if kernels.available():
            if stage:
                return kernels.bounded_rows(self.token_rows, TOKEN_RANGE, index, qmin, qmax,
                                            RANGE_EDGE, out, stage, self.token_cum)
            return kernels.bounded_rows(self._rows, TOKEN_RANGE, index, qmin, qmax, RANGE_EDGE,
                                        out)
        rows = truncate_rows(self.rows(index), qmin, qmax)
        return stage_rows(rows) if stage else rows


def token_bounds(pred: np.ndarray, shifts: np.ndarray, lo: int, hi: int):
    """Least and greatest quantised residual ``q`` a voxel predicted as ``pred`` can have
    within ``[lo, hi]``, at its row's shift."""
    return (lo - pred) >> shifts, (hi - pred) >> shifts


RANGE_EDGE = 8   # rows are truncated where the dtype's range ends this close (in tokens)


def truncate_rows(rows: np.ndarray, qmin: np.ndarray, qmax: np.ndarray) -> np.ndarray:
    """Token rows (one per symbol, modified in place) with no probability for tokens outside
    ``[qmin, qmax]``, for symbols whose range ends within ``RANGE_EDGE`` tokens: the range
    coder then spends (almost) nothing on residuals the dtype cannot hold (an MR's background
    sits at 0 of a uint16). Further ends cut little probability and would cost decoding time
    (chosen on train volumes: 88% of the gain on 27% of the symbols). Constriction still gives
    every zero its smallest probability, and the true token is always inside."""
    edge = np.flatnonzero((qmin >= -RANGE_EDGE) | (qmax < RANGE_EDGE))
    if edge.size:
        q = np.arange(-TOKEN_RANGE, TOKEN_RANGE)
        lo, hi = qmin[edge, None], qmax[edge, None]
        part = rows[edge]
        part[:, :2 * TOKEN_RANGE] *= (q >= lo) & (q <= hi)
        part[:, ESC_NEG] *= lo[:, 0] < -TOKEN_RANGE
        part[:, ESC_POS] *= hi[:, 0] >= TOKEN_RANGE
        rows[edge] = part
    return rows


def stage_rows(rows: np.ndarray) -> np.ndarray:
    """First-stage rows (format 5) of whole, truncated token rows: the direct tokens ``q`` in
    ``[-S, S)``, then the sums of what lies below and above them (escapes included). The
    frequencies are integers, so every order of summing gives the same floats."""
    T, S = TOKEN_RANGE, STAGE_RANGE
    out = np.empty((len(rows), STAGE_WIDTH))
    out[:, :2 * S] = rows[:, T - S:T + S]
    out[:, 2 * S] = rows[:, :T - S].sum(axis=1) + rows[:, ESC_NEG]
    out[:, 2 * S + 1] = rows[:, T + S:2 * T].sum(axis=1) + rows[:, ESC_POS]
    return out


def tail_rows(rows: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Second-stage rows of whole, truncated token rows, for symbols beyond ``[-S, S)``:
    that side's direct tokens (below: from ``-T``; above: from ``S``), then its escape."""
    T, S = TOKEN_RANGE, STAGE_RANGE
    out = np.zeros((len(rows), TAIL_WIDTH))
    out[:, :BEYOND] = np.where(above[:, None], rows[:, T + S:2 * T], rows[:, :BEYOND])
    out[:, BEYOND] = np.where(above, rows[:, ESC_POS], rows[:, ESC_NEG])
    return out


def _stage_tables():
    """Each token's first-stage symbol and second-stage symbol (-1: none), as lookup tables."""
    T, S = TOKEN_RANGE, STAGE_RANGE
    token = np.arange(N_TOKENS)
    below = (token < T - S) | (token == ESC_NEG)
    above = ((token >= T + S) & (token < 2 * T)) | (token == ESC_POS)
    first = np.where(below, 2 * S, np.where(above, 2 * S + 1, token - (T - S)))
    second = np.where(token >= ESC_NEG, BEYOND, np.where(above, token - (T + S), token))
    return first, np.where(below | above, second, -1)


_FIRST_OF, _SECOND_OF = _stage_tables()


def stage_symbols(token: np.ndarray):
    """A token's two stages: its first-stage symbol, and for symbols beyond ``[-S, S)`` (the
    mask returned) their side (True: above) and second-stage symbol."""
    first = np.take(_FIRST_OF, token)
    beyond = first >= 2 * STAGE_RANGE
    far = first[beyond]
    return first, beyond, far == 2 * STAGE_RANGE + 1, np.take(_SECOND_OF, token[beyond])


def stage_tokens(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Inverse of :func:`stage_symbols`: tokens from the first-stage symbols and the second
    stage of those beyond (in order)."""
    T, S = TOKEN_RANGE, STAGE_RANGE
    token = first + (T - S)
    beyond = first >= 2 * S
    if (second > BEYOND).any():
        raise ValueError("a second-stage token outside its side's alphabet: corrupt stream")
    if beyond.any():
        up = first[beyond] == 2 * S + 1
        token[beyond] = np.where(second == BEYOND, np.where(up, ESC_POS, ESC_NEG),
                                 np.where(up, second + T + S, second))
    return token


def _words(encoder) -> np.ndarray:
    return encoder.get_compressed().astype("<u4")


def _interleave(parts):
    """Concatenate ``parts`` (tuples of (steps, values, ...)) ordered by step, then part, then
    original position: the order a step-by-step decoder reads them."""
    filled = [p for p in parts if len(p[0])]
    if len(filled) <= 1:        # one part, already in step order: nothing to interleave
        return [np.asarray(c) for c in (filled or parts)[0][1:]]
    key = np.concatenate([steps * len(parts) + i for i, (steps, *_rest) in enumerate(parts)])
    order = np.argsort(key, kind="stable")
    return [np.concatenate(cols)[order] for cols in zip(*(p[1:] for p in parts))]


def encode_slice(tables: CodingTables, sym: Symbols, j: np.ndarray, step_of: np.ndarray,
                 bounds=None, two_stage: bool = False):
    """Code one slice's symbols (already in wavefront order, ``step_of`` non-decreasing);
    ``bounds``: each symbol's :func:`token_bounds`, to code within the dtype's range;
    ``two_stage``: tokens in two stages (blob format 5, which always has ``bounds``).

    Returns the streams (tokens, uniform[, tail]) as little-endian uint32 arrays.
    """
    if two_stage:
        return _encode_two_stage(tables, sym, j, step_of, bounds)
    esc = np.flatnonzero(sym.token >= ESC_NEG)
    class_rows = np.full(len(esc), tables.class_row)
    tokens, classes = (step_of, sym.token, j), (step_of[esc], sym.cls[esc], class_rows)
    if bounds is not None:
        wide = np.full(len(esc), 1 << 40)   # escape classes are not truncated
        tokens, classes = tokens + tuple(bounds), classes + (-wide, wide)
    values, rows, *bounds_in_order = _interleave([tokens, classes])
    tok = constriction.stream.queue.RangeEncoder()
    if bounds is None:
        _encode_chunks(tok, values, lambda a, b: tables.rows(rows[a:b]))
    else:
        out = np.empty((min(len(values), CODE_CHUNK), N_TOKENS))
        qmin, qmax = bounds_in_order
        _encode_chunks(tok, values, lambda a, b: tables.bounded_rows(rows[a:b], qmin[a:b],
                                                                     qmax[a:b], out))
    return _words(tok), _encode_uniform(sym, step_of)


def _encode_uniform(sym: Symbols, step_of: np.ndarray) -> np.ndarray:
    """The uniform stream: per step, the low bits of its symbols, then its extra bits."""
    low = sym.low_bits > 0
    extra = sym.extra_bits > 0
    uval, ubits = _interleave([
        (step_of[low], sym.low[low], sym.low_bits[low]),
        (step_of[extra], sym.extra[extra], sym.extra_bits[extra])])
    uni = constriction.stream.queue.RangeEncoder()
    if len(uval):
        uni.encode(uval.astype(np.int32), _UNIFORM, (1 << ubits).astype(np.int32))
    return _words(uni)


def _encode_chunks(coder, values: np.ndarray, rows) -> None:
    """``values`` with the rows ``rows(a, b)`` gives for ``values[a:b]``, in pieces whose rows
    stay in cache (the same stream as one call)."""
    values = values.astype(np.int32, copy=False)
    for a in range(0, len(values), CODE_CHUNK):
        coder.encode(values[a:a + CODE_CHUNK], _CATEGORICAL, rows(a, a + CODE_CHUNK))


def _encode_two_stage(tables: CodingTables, sym: Symbols, j: np.ndarray, step_of: np.ndarray,
                      bounds) -> tuple:
    """:func:`encode_slice` of format 5: first stages, uniform bits, then the tail stream."""
    qmin, qmax = bounds
    first, beyond, above, second = stage_symbols(sym.token)
    tok = constriction.stream.queue.RangeEncoder()
    out = np.empty((min(len(first), CODE_CHUNK), STAGE_WIDTH))
    _encode_chunks(tok, first, lambda a, b: tables.bounded_rows(j[a:b], qmin[a:b], qmax[a:b],
                                                                out, STAGE_RANGE))
    far = np.flatnonzero(beyond)
    esc = np.flatnonzero(sym.token >= ESC_NEG)
    rows = np.concatenate([tables.tail_rows(j[far], qmin[far], qmax[far], above),
                           np.tile(tables.tail_classes, (len(esc), 1))])
    values, at = _interleave([(step_of[far], second, np.arange(len(far))),
                              (step_of[esc], sym.cls[esc], len(far) + np.arange(len(esc)))])
    tail = constriction.stream.queue.RangeEncoder()
    _encode_chunks(tail, values, lambda a, b: np.take(rows, at[a:b], axis=0))
    return _words(tok), _encode_uniform(sym, step_of), _words(tail)


def encode_residuals(tables: CodingTables, r: np.ndarray, j: np.ndarray, pred: np.ndarray,
                     step_of: np.ndarray, bounds: tuple[int, int]) -> tuple:
    """:func:`encode_slice` of format 5 from a slice's residuals ``r`` (wavefront order) at
    table rows ``j``, predicted as ``pred`` within ``bounds``, by the compiled kernels: their
    symbols in one pass (models.kernels.slice_symbols), the first stages' rows as the decoder
    makes them. The same streams as :func:`split_residuals` and :func:`encode_slice` give."""
    syms = kernels.slice_symbols(r, j, np.take(tables.shifts, j), pred, step_of,
                                 tables.token_rows, tables.tail_classes, TOKEN_RANGE,
                                 STAGE_RANGE, bounds, RANGE_EDGE)
    out = np.empty((min(len(r), CODE_CHUNK), STAGE_WIDTH))

    def first_rows(a: int, b: int) -> np.ndarray:
        kernels.token_rows(tables.token_rows, TOKEN_RANGE, tables.shifts, j[a:b], pred[a:b],
                           bounds, RANGE_EDGE, out, STAGE_RANGE, tables.token_cum)
        return out[:len(j[a:b])]

    tok, tail, uni = (constriction.stream.queue.RangeEncoder() for _ in range(3))
    _encode_chunks(tok, syms.first, first_rows)
    _encode_chunks(tail, syms.tail, lambda a, b: syms.tail_rows[a:b])
    if len(syms.uniform):
        uni.encode(syms.uniform, _UNIFORM, syms.sizes)
    return _words(tok), _words(uni), _words(tail)


class StepDecoder:
    """Decodes many slices' streams together, one wavefront step at a time, in the order
    :func:`encode_slice` wrote them; with ``bounds`` (the dtype's ``lo, hi``), as coded
    within that range; ``streams`` holds each slice's (tokens, uniform) streams, and with
    ``two_stage`` (format 5) its tail stream third."""

    def __init__(self, tables: CodingTables, streams, bounds: tuple[int, int] | None = None,
                 two_stage: bool = False):
        if two_stage and bounds is None:
            raise ValueError("two-stage tokens are coded within the range (format 5)")
        self.tables = tables
        self.bounds = bounds
        self.stage = STAGE_RANGE if two_stage else 0
        new = constriction.stream.queue.RangeDecoder
        self.tok, self.uni, *tail = ([new(np.ascontiguousarray(s[k], np.uint32)) for s in streams]
                                     for k in range(3 if two_stage else 2))
        self.tail = tail[0] if tail else self.tok      # where the escape classes are
        # probability rows, reused from step to step
        self._buffer = np.empty((0, STAGE_WIDTH if two_stage else N_TOKENS))
        self._fast = kernels.available()
        # format 5 on the compiled path: a step's work between the range decoders' calls in
        # three compiled calls (decode_fields)
        self.fields = kernels.StepFields(tables.token_rows, TOKEN_RANGE, STAGE_RANGE, *bounds,
                                         RANGE_EDGE, TAIL_WIDTH) \
            if two_stage and self._fast else None
        self._class_rows = np.empty((0, TAIL_WIDTH))

    def _per_stream(self, decoders, segments, mask, model, params):
        """Decode ``params`` (one row per masked symbol; ``mask`` None: every symbol) from each
        segment's stream."""
        if mask is None:
            bounds = [(a, b) for _, a, b in segments]
        else:
            at = np.flatnonzero(mask).searchsorted([e for seg in segments for e in seg[1:]])
            bounds = zip(at[0::2].tolist(), at[1::2].tolist())
        out = _segment_parts(decoders, [stream for stream, _, _ in segments], bounds, model,
                             params)
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def _rows(self, j: np.ndarray, pred: np.ndarray):
        """Probability rows of the step's tokens (first stages, in format 5) and their
        low-bit counts."""
        if not self._fast:
            sh = self.tables.shifts[j]
            rows = self.tables.rows(j)
            if self.bounds is not None:
                truncate_rows(rows, *token_bounds(pred, sh, *self.bounds))
            return (stage_rows(rows) if self.stage else rows), sh
        if len(self._buffer) < len(j):
            self._buffer = np.empty((max(len(j), 2 * len(self._buffer)),
                                     self._buffer.shape[1]))
        sh = kernels.token_rows(self.tables.token_rows, TOKEN_RANGE, self.tables.shifts, j, pred,
                                self.bounds, RANGE_EDGE, self._buffer, self.stage,
                                self.tables.token_cum if self.stage else None)
        return self._buffer[:len(j)], sh

    def _two_stage_tokens(self, segments, j: np.ndarray, pred: np.ndarray, rows) -> np.ndarray:
        """Tokens from their first stages (``rows``) and, for those beyond, the tail stream."""
        first = self._per_stream(self.tok, segments, None, _CATEGORICAL, rows)
        beyond = first >= 2 * STAGE_RANGE
        second = np.zeros(0, np.int64)
        if beyond.any():
            above = first[beyond] == 2 * STAGE_RANGE + 1
            jb = j[beyond]
            qmin, qmax = token_bounds(pred[beyond], self.tables.shifts[jb], *self.bounds)
            tail = self.tables.tail_rows(jb, qmin, qmax, above)
            second = self._per_stream(self.tail, segments, beyond, _CATEGORICAL, tail)
        if not self._fast:
            return stage_tokens(first, second)
        token = kernels.stage_tokens(first, second, TOKEN_RANGE, STAGE_RANGE)
        if token is None:
            raise ValueError("a second-stage token outside its side's alphabet: corrupt stream")
        return token

    def decode_fields(self, streams: list[int], ends: list[int], rows: np.ndarray, at
                      ) -> np.ndarray | None:
        """:meth:`decode_step`'s decoded values (predictions plus residuals) where
        :attr:`fields` runs (format 5, compiled kernels): the step's symbols lie in segments,
        ``streams[k]`` holding those up to ``ends[k]``; ``rows`` are their first-stage rows and
        ``at`` the addresses of their predictions, table rows and shifts
        (models.kernels.StepKernel). None when a value falls outside the range."""
        f, n, nseg = self.fields, len(rows), len(ends)
        f.reserve(n, ends)
        pred, row, sh = at
        _joined(_segment_parts(self.tok, streams, zip([0, *ends[:-1]], ends), _CATEGORICAL,
                               rows), f.first, n)
        m = f.tail_rows(n, nseg, row, pred, sh)
        if m:
            self._per_segment(self.tail, streams, f.beyond, nseg, _CATEGORICAL, f.tail, f.second)
        n_esc, n_low = f.tokens(n, m, nseg, sh)
        n_extra = 0
        if n_esc:
            if len(self._class_rows) < n_esc:
                self._class_rows = np.tile(self.tables.tail_classes, (max(n_esc, 64), 1))
            self._per_segment(self.tail, streams, f.escapes, nseg, _CATEGORICAL,
                              self._class_rows, f.cls, repeat=True)
        if n_low:
            self._per_segment(self.uni, streams, f.lows, nseg, _UNIFORM, f.sizes, f.low)
        if n_esc:
            cls = f.cls[:n_esc]
            big = cls > 1
            n_extra = int(big.sum())
            if n_extra:     # rare: numpy will do
                sizes = (1 << (cls[big] - 1)).astype(np.int32)
                firsts = np.concatenate([[0], np.cumsum(big)])[f.escapes[:nseg + 1]]
                self._per_segment(self.uni, streams, firsts, nseg, _UNIFORM, sizes, f.extra)
        return f.join(n, n_low, n_esc, n_extra, pred, sh)

    @staticmethod
    def _per_segment(decoders, streams, firsts, nseg: int, model, params, out,
                     repeat: bool = False) -> None:
        """Decode each segment's share of a field (``firsts[k]``: its first symbol's index in
        the field; ``params`` their model parameters, or with ``repeat`` the same leading rows
        for every segment) into ``out``."""
        c = firsts[:nseg + 1].tolist()
        _joined(_segment_parts(decoders, streams, zip(c, c[1:]), model, params, repeat), out,
                c[-1])

    def decode_step(self, segments, j: np.ndarray, pred: np.ndarray, rows_sh=None
                    ) -> np.ndarray:
        """Residuals of one step from the predictions ``pred`` at table rows ``j``.
        ``segments`` lists ``(stream, start, stop)``: which stream holds the symbols
        ``j[start:stop]``; ``rows_sh``: their probability rows and low-bit counts when the
        caller has them (models.kernels.StepKernel)."""
        rows, sh = self._rows(j, pred) if rows_sh is None else rows_sh
        if self.stage:
            token = self._two_stage_tokens(segments, j, pred, rows)
        else:
            token = self._per_stream(self.tok, segments, None, _CATEGORICAL, rows)
        esc = token >= ESC_NEG
        cls = np.zeros(0, np.int64)
        if esc.any():
            n_esc = int(esc.sum())
            rows = np.tile(self.tables.tail_classes, (n_esc, 1)) if self.stage \
                else self.tables.rows(np.full(n_esc, self.tables.class_row))
            cls = self._per_stream(self.tail, segments, esc, _CATEGORICAL, rows)
        low = np.zeros(0, np.int64)
        has_low = sh > 0
        if has_low.any():
            sizes = (1 << sh[has_low]).astype(np.int32)
            low = self._per_stream(self.uni, segments, has_low, _UNIFORM, sizes)
        extra = np.zeros(0, np.int64)
        has_extra = cls > 1
        if has_extra.any():
            sizes = (1 << (cls[has_extra] - 1)).astype(np.int32)
            extra = self._per_stream(self.uni, segments, _scattered(esc, has_extra), _UNIFORM,
                                     sizes)
        if self._fast:
            residuals = kernels.join(token, sh, low, cls, extra, TOKEN_RANGE)
            if residuals is None:
                raise ValueError("decoded escape fields do not match their tokens")
            return residuals
        return join_residuals(token, _expand(low, has_low), j, _expand(cls, esc),
                              _expand(extra, _scattered(esc, has_extra)), self.tables.shifts)


def _segment_parts(decoders, streams, bounds, model, params, repeat: bool = False
                   ) -> list[np.ndarray]:
    """Each segment's share of a field, decoded from its stream (``decoders[streams[k]]``):
    the field's symbols ``bounds[k] = (a, b)``, with the model parameters ``params[a:b]``, or
    with ``repeat`` the same leading rows ``params[:b - a]`` for every segment."""
    return [decoders[s].decode(model, params[:b - a] if repeat else params[a:b])
            for s, (a, b) in zip(streams, bounds) if b > a]


def _joined(parts: list[np.ndarray], out: np.ndarray, n: int) -> None:
    """``parts`` (a symbol per row they were decoded with: ``n`` in all) one after the other
    into ``out[:n]``."""
    if n:
        np.concatenate(parts, out=out[:n])


def _scattered(mask: np.ndarray, sub: np.ndarray) -> np.ndarray:
    """The mask of the symbols selected by ``sub`` among those selected by ``mask``."""
    out = np.zeros(len(mask), bool)
    out[np.flatnonzero(mask)[sub]] = True
    return out


def _expand(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` of the masked symbols, zeros elsewhere."""
    out = np.zeros(len(mask), np.int64)
    out[mask] = values
    return out
