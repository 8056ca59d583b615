// Kernels of the activation map: the SimHash that picks a sample's cell, and the 12 functions
// (activations.h) applied over contiguous runs: one function, a per-element function index (a fixed map), or a probability-weighted mixture
// of all 12 (a learnable map while training), each with its backward.
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

// out[i] = sum_k w[k * ld + i] * f_k(x[i]).
template <class T>
void apply_mixture(const T* w, int64_t ld, const T* x, int64_t n, T* out);

// The mixture's backward: grad_x[i] = grad[i] * sum_k w[k * ld + i] * f'_k(x[i]), and
// grad_w[k * ld + i] += grad[i] * f_k(x[i]).
template <class T>
void mixture_backward(const T* w, int64_t ld, const T* x, const T* grad, int64_t n, T* grad_x,
                      T* grad_w);

// A softmax over the 12 functions for each of n columns, everything function-major: logit k
// of column j at logits[k * ld + j], its probability at probs[k * ld + j]. The layout the
// mixture kernels read probabilities in (and a learnable map keeps its logits in).
template <class T>
void softmax_columns(const T* logits, int64_t ld, int64_t n, T* probs);

// Its backward: grad_logits[k * ld + j] = p_k (g_k - sum_i g_i p_i) with p_k = probs[k * ld + j]
// and g_k = grad_probs[k * ld + j].
template <class T>
void softmax_columns_backward(const T* grad_probs, const T* probs, int64_t ld, int64_t n,
                              T* grad_logits);

}  // namespace spatium::act
