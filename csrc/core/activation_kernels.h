// Kernels of the activation map: the SimHash that picks a sample's cell, the 12 functions
// (activations.h) applied over contiguous runs, one function or a per-element function index (a
// map), each with its backward; a learnable map's backward, which also weighs switching each
// element to every other function, and the argmax that turns its logits into functions.
//
// float32 runs through branch-free polynomial versions of the functions, evaluated with shared
// subexpressions (one exp(-|x|) serves elu, sigmoid, silu, tanh and softplus) and vectorised
// with runtime dispatch to AVX2/AVX-512; accuracy is a few ulp. Every kernel computes a
// function's value at a point with the same code, so a map equals its functions applied one at
// a time, bit for bit. float64 uses the libm-based functions of activations.h.
#pragma once

#include <cstdint>

#include "core/activations.h"

namespace spatium::act {

// cells[b] = sum over j < bits of (dot(x[b], projections[j]) > 0) << j, for x [batch, features]
// and projections [bits, features], both row-major.
template <class T>
void simhash(const T* x, int64_t batch, int64_t features, const T* projections, int bits,
             int64_t* cells);

// out[i] = f(x[i]), or grad[i] * f'(x[i]) when grad is given.
template <class T>
void apply_one(Fn fn, const T* x, const T* grad, int64_t n, T* out);

// out[i] = f_{fns[i]}(x[i]), or grad[i] * f'_{fns[i]}(x[i]) when grad is given. fns[i] < 12.
template <class T>
void apply_table(const uint8_t* fns, const T* x, const T* grad, int64_t n, T* out);

// A learnable map's backward (its forward is apply_table with the argmax functions fns): grad_x[i]
// = grad[i] * f'_{fns[i]}(x[i]), and gains[k * ld + i] += grad[i] * (f_k(x[i]) - f_{fns[i]}(x[i])),
// the first-order change of the loss were element i's function switched to k; when total_gains
// is given, total_gains[k] += the sum of those n gains (a factored map's cell logits).
template <class T>
void switch_backward(const uint8_t* fns, const T* x, const T* grad, int64_t n, T* grad_x,
                     T* gains, int64_t ld, T* total_gains = nullptr);

// fns[j] = the first k with the largest logits[k * ld + j] over the 12 functions (a NaN counts as
// the largest, as in torch.argmax), for each of n columns: logits function-major, the layout a
// learnable map keeps them in.
template <class T>
void argmax_columns(const T* logits, int64_t ld, int64_t n, uint8_t* fns);

// A factored map's argmax: as argmax_columns over the logits neuron_logits[k * ld + j] +
// cell_logits[k] + (initial[j] == k ? lead : 0), that sum in that order, for the n neurons of
// one cell (neuron logits function-major, as a factored map keeps them).
template <class T>
void argmax_factored(const T* neuron_logits, int64_t ld, const T* cell_logits,
                     const uint8_t* initial, T lead, int64_t n, uint8_t* fns);

}  // namespace spatium::act
