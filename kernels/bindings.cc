// nanobind bindings: numpy arrays are shared without copying (the Python wrapper makes them
// contiguous float32 first) and the GIL is released around the kernel.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>

#include "topk.h"

namespace nb = nanobind;

using F32Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using F32Vector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8Vector = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutScores = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using OutIds = nb::ndarray<int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

static void topk_f32(F32Matrix queries, F32Matrix gallery, int64_t k, int threads,
                     std::optional<U8Vector> allow, std::optional<F32Vector> min_score,
                     OutScores out_scores, OutIds out_ids) {
  const int64_t Q = static_cast<int64_t>(queries.shape(0));
  const int64_t D = static_cast<int64_t>(queries.shape(1));
  const int64_t N = static_cast<int64_t>(gallery.shape(0));
  if (static_cast<int64_t>(gallery.shape(1)) != D)
    throw clapedge::KernelInputError("queries and gallery differ in dimension");
  if (static_cast<int64_t>(out_scores.shape(0)) != Q || static_cast<int64_t>(out_scores.shape(1)) != k ||
      static_cast<int64_t>(out_ids.shape(0)) != Q || static_cast<int64_t>(out_ids.shape(1)) != k)
    throw clapedge::KernelInputError("output arrays must be [Q, k]");
  clapedge::TopKParams params;
  params.k = k;
  params.threads = threads;
  if (allow) {
    if (static_cast<int64_t>(allow->shape(0)) < (N + 7) / 8)
      throw clapedge::KernelInputError("allow bitmap shorter than the gallery");
    params.allow = allow->data();
  }
  if (min_score) {
    if (static_cast<int64_t>(min_score->shape(0)) != Q)
      throw clapedge::KernelInputError("min_score must have one value per query");
    params.min_score = min_score->data();
  }
  nb::gil_scoped_release release;
  clapedge::topk_f32(queries.data(), Q, gallery.data(), N, D, params, out_scores.data(),
                     out_ids.data());
}

NB_MODULE(_native, m) {
  m.doc() = "clapedge native kernels: fused similarity + top-k";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const clapedge::KernelInputError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("topk_f32", &topk_f32, nb::arg("queries"), nb::arg("gallery"), nb::arg("k"),
        nb::arg("threads"), nb::arg("allow").none(), nb::arg("min_score").none(),
        nb::arg("out_scores"), nb::arg("out_ids"));
}
