// nanobind bindings: numpy arrays are shared without copying (read-only memory maps included)
// and the GIL is released around the heavy calls. Sizes are checked here so that a gallery
// whose arrays do not match its shape raises ValueError instead of reading out of bounds.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>
#include <nanobind/stl/unique_ptr.h>

#include <optional>
#include <string>
#include <vector>

#include "frontend.h"
#include "gallery.h"
#include "probe.h"
#include "topk.h"

namespace nb = nanobind;
using clapedge::KernelInputError;

using F32Matrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using F32Vector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I32Vector = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using U8Vector = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using I8Matrix = nb::ndarray<const int8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using AnyArray = nb::ndarray<nb::ro, nb::c_contig, nb::device::cpu>;
using OutF32 = nb::ndarray<float, nb::c_contig, nb::device::cpu>;
using OutI64 = nb::ndarray<int64_t, nb::c_contig, nb::device::cpu>;
using OutI32 = nb::ndarray<int32_t, nb::c_contig, nb::device::cpu>;
using OutI8 = nb::ndarray<int8_t, nb::c_contig, nb::device::cpu>;

namespace {

void require(bool ok, const std::string& what) {
  if (!ok) throw KernelInputError(what);
}

bool is_dtype(const AnyArray& a, nb::dlpack::dtype_code code, int bits) {
  return a.dtype().code == static_cast<uint8_t>(code) && a.dtype().bits == bits &&
         a.dtype().lanes == 1;
}

clapedge::DType parse_dtype(const std::string& s) {
  if (s == "float32") return clapedge::DType::Float32;
  if (s == "fp16" || s == "float16") return clapedge::DType::Float16;
  if (s == "int8") return clapedge::DType::Int8;
  throw KernelInputError("unknown gallery dtype '" + s + "' (expected float32, fp16 or int8)");
}

clapedge::SimdLevel parse_level(const std::string& s) {
  for (auto l : {clapedge::SimdLevel::Auto, clapedge::SimdLevel::Scalar, clapedge::SimdLevel::Neon,
                 clapedge::SimdLevel::NeonDotprod, clapedge::SimdLevel::Avx2,
                 clapedge::SimdLevel::Avx512, clapedge::SimdLevel::Amx})
    if (s == clapedge::simd_level_name(l)) return l;
  throw KernelInputError("unknown SIMD level '" + s + "'");
}

// Float16 data may arrive as numpy float16 or as its raw uint16 bits.
void check_float_rows(const AnyArray& a, clapedge::DType dtype, int64_t n, int64_t dim,
                      const char* what) {
  const bool ok = dtype == clapedge::DType::Float32
                      ? is_dtype(a, nb::dlpack::dtype_code::Float, 32)
                      : is_dtype(a, nb::dlpack::dtype_code::Float, 16) ||
                            is_dtype(a, nb::dlpack::dtype_code::UInt, 16);
  require(ok, std::string(what) + " has the wrong element type");
  require(static_cast<int64_t>(a.size()) == n * dim,
          std::string(what) + " holds " + std::to_string(a.size()) + " values, expected " +
              std::to_string(n) + " x " + std::to_string(dim));
}

void topk(F32Matrix queries, AnyArray vectors, const std::string& dtype, int64_t num_vectors,
          std::optional<F32Vector> scales, std::optional<I32Vector> corrections,
          std::optional<AnyArray> rerank, const std::string& rerank_dtype, int64_t rerank_factor,
          int64_t k, int threads, std::optional<U8Vector> allow,
          std::optional<F32Vector> min_score, const std::string& simd, const std::string& device,
          OutF32 out_scores, OutI64 out_ids) {
  clapedge::TopKParams p;
  p.k = k;
  p.num_queries = static_cast<int64_t>(queries.shape(0));
  p.dim = static_cast<int64_t>(queries.shape(1));
  p.queries = queries.data();
  p.dtype = parse_dtype(dtype);
  p.num_vectors = num_vectors;
  p.vectors = vectors.data();
  require(num_vectors >= 0, "num_vectors must be >= 0");
  const int64_t N = num_vectors, D = p.dim;
  if (p.dtype == clapedge::DType::Int8) {
    const int64_t rows = clapedge::num_groups(N) * clapedge::kGroupRows;
    require(is_dtype(vectors, nb::dlpack::dtype_code::Int, 8), "int8 codes must be int8");
    require(static_cast<int64_t>(vectors.size()) ==
                clapedge::num_groups(N) * clapedge::group_bytes(D),
            "int8 codes do not match the gallery shape (" + std::to_string(N) + " x " +
                std::to_string(D) + ")");
    require(scales && static_cast<int64_t>(scales->shape(0)) == rows,
            "int8 scales must have one entry per row, padded to a multiple of 16");
    require(corrections && static_cast<int64_t>(corrections->shape(0)) == rows,
            "int8 corrections must have one entry per row, padded to a multiple of 16");
    p.scales = scales->data();
    p.corrections = corrections->data();
  } else {
    check_float_rows(vectors, p.dtype, N, D, "gallery");
  }
  if (rerank) {
    p.rerank_dtype = parse_dtype(rerank_dtype);
    check_float_rows(*rerank, p.rerank_dtype, N, D, "re-rank copy");
    p.rerank_vectors = rerank->data();
    p.rerank_factor = rerank_factor;
  }
  require(static_cast<int64_t>(out_scores.size()) == p.num_queries * k &&
              static_cast<int64_t>(out_ids.size()) == p.num_queries * k,
          "output arrays must be [Q, k]");
  p.out_scores = out_scores.data();
  p.out_ids = out_ids.data();
  p.threads = threads;
  if (allow) {
    require(static_cast<int64_t>(allow->shape(0)) >= (N + 7) / 8,
            "allow bitmap shorter than the gallery");
    p.allow = allow->data();
  }
  if (min_score) {
    require(static_cast<int64_t>(min_score->shape(0)) == p.num_queries,
            "min_score must have one value per query");
    p.min_score = min_score->data();
  }
  p.simd = parse_level(simd);
  require(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda'");
  p.device = device == "cuda" ? clapedge::Device::Cuda : clapedge::Device::Cpu;
  nb::gil_scoped_release release;
  clapedge::topk(p);
}

void quantize_int8(F32Matrix x, OutI8 codes, OutF32 scales, int threads) {
  const int64_t n = static_cast<int64_t>(x.shape(0)), d = static_cast<int64_t>(x.shape(1));
  require(static_cast<int64_t>(codes.size()) == n * d && static_cast<int64_t>(scales.size()) >= n,
          "output arrays do not match the input");
  nb::gil_scoped_release release;
  clapedge::quantize_rows_int8(x.data(), n, d, codes.data(), scales.data(), threads);
}

void pack_int8(I8Matrix codes, OutI8 packed, OutI32 corrections, int threads) {
  const int64_t n = static_cast<int64_t>(codes.shape(0)), d = static_cast<int64_t>(codes.shape(1));
  require(static_cast<int64_t>(packed.size()) == clapedge::num_groups(n) * clapedge::group_bytes(d) &&
              static_cast<int64_t>(corrections.size()) == clapedge::num_groups(n) * clapedge::kGroupRows,
          "output arrays do not match the grouped layout");
  nb::gil_scoped_release release;
  clapedge::pack_int8(codes.data(), n, d, packed.data(), corrections.data(), threads);
}

void unpack_int8(AnyArray packed, int64_t n, int64_t d, OutI8 codes) {
  require(is_dtype(packed, nb::dlpack::dtype_code::Int, 8) &&
              static_cast<int64_t>(packed.size()) == clapedge::num_groups(n) * clapedge::group_bytes(d),
          "packed codes do not match the shape");
  require(static_cast<int64_t>(codes.size()) == n * d, "output must be [n, d]");
  nb::gil_scoped_release release;
  clapedge::unpack_int8(static_cast<const int8_t*>(packed.data()), n, d, codes.data());
}

std::vector<std::string> available_simd_levels() {
  std::vector<std::string> out;
  for (auto l : {clapedge::SimdLevel::Amx, clapedge::SimdLevel::Avx512, clapedge::SimdLevel::Avx2,
                 clapedge::SimdLevel::NeonDotprod, clapedge::SimdLevel::Neon,
                 clapedge::SimdLevel::Scalar})
    if (clapedge::simd_level_available(l)) out.push_back(clapedge::simd_level_name(l));
  return out;
}

double read_bandwidth(AnyArray buffer, int threads, int repeats) {
  const auto* p = static_cast<const uint8_t*>(buffer.data());
  const size_t bytes = buffer.nbytes();
  nb::gil_scoped_release release;
  return clapedge::probe::read_bandwidth(p, bytes, threads, repeats);
}

double int8_peak_ops(const std::string& simd, int threads, double seconds) {
  const clapedge::SimdLevel level = parse_level(simd);
  nb::gil_scoped_release release;
  return clapedge::probe::int8_peak_macs(level, threads, seconds);
}


// ---- native front end ----
namespace fe = clapedge::frontend;
using F32Any = nb::ndarray<const float, nb::c_contig, nb::device::cpu>;
using I8Any = nb::ndarray<const int8_t, nb::c_contig, nb::device::cpu>;

std::vector<float> f32_values(const nb::dict& d, const char* key) {
  if (!d.contains(key) || d[key].is_none()) return {};
  F32Any a;
  if (!nb::try_cast(d[key], a)) throw KernelInputError(std::string(key) + " must be a float32 array");
  return std::vector<float>(a.data(), a.data() + a.size());
}

std::vector<int8_t> i8_values(const nb::dict& d, const char* key) {
  I8Any a;
  if (!d.contains(key) || !nb::try_cast(d[key], a))
    throw KernelInputError(std::string(key) + " must be an int8 array");
  return std::vector<int8_t>(a.data(), a.data() + a.size());
}

int64_t int_value(const nb::dict& d, const char* key) {
  if (!d.contains(key)) throw KernelInputError(std::string("missing ") + key);
  return nb::cast<int64_t>(d[key]);
}

float float_value(const nb::dict& d, const char* key, float fallback) {
  return d.contains(key) ? nb::cast<float>(d[key]) : fallback;
}

std::unique_ptr<fe::FrontEnd> make_front_end(const nb::list& layers, std::optional<nb::dict> proj) {
  std::vector<fe::LayerSpec> specs;
  for (size_t i = 0; i < layers.size(); ++i) {
    const nb::dict d = nb::cast<nb::dict>(layers[i]);
    fe::LayerSpec l;
    l.kernel = int_value(d, "kernel");
    l.stride = int_value(d, "stride");
    l.cin = int_value(d, "cin");
    l.cout = int_value(d, "cout");
    if (i == 0)
      l.weight_f32 = f32_values(d, "weight");
    else {
      l.weight_i8 = i8_values(d, "weight");
      l.weight_scale = f32_values(d, "weight_scale");
    }
    l.bias = f32_values(d, "bias");
    const std::string norm = d.contains("norm") ? nb::cast<std::string>(d["norm"]) : "none";
    if (norm == "none") l.norm = fe::Norm::None;
    else if (norm == "group") l.norm = fe::Norm::GroupTime;
    else if (norm == "layer") l.norm = fe::Norm::LayerChannel;
    else throw KernelInputError("unknown norm '" + norm + "' (expected none, group or layer)");
    l.norm_weight = f32_values(d, "norm_weight");
    l.norm_bias = f32_values(d, "norm_bias");
    l.norm_eps = float_value(d, "norm_eps", 1e-5f);
    specs.push_back(std::move(l));
  }
  fe::ProjectionSpec p;
  if (proj) {
    const nb::dict& d = *proj;
    p.present = true;
    p.din = int_value(d, "din");
    p.dout = int_value(d, "dout");
    p.layer_norm = d.contains("layer_norm") && nb::cast<bool>(d["layer_norm"]);
    p.ln_weight = f32_values(d, "ln_weight");
    p.ln_bias = f32_values(d, "ln_bias");
    p.ln_eps = float_value(d, "ln_eps", 1e-5f);
    p.weight_i8 = i8_values(d, "weight");
    p.weight_scale = f32_values(d, "weight_scale");
    p.bias = f32_values(d, "bias");
  }
  return std::make_unique<fe::FrontEnd>(std::move(specs), std::move(p));
}

void run_front_end(const fe::FrontEnd& f, F32Vector wave, int64_t valid_samples, OutF32 out,
                   int threads, const std::string& simd) {
  const int64_t samples = static_cast<int64_t>(wave.shape(0));
  const int64_t frames = f.frames(samples);
  require(frames >= 1, std::to_string(samples) + " samples are too few for one output frame");
  require(static_cast<int64_t>(out.size()) == frames * f.out_channels(),
          "output must be [" + std::to_string(frames) + ", " + std::to_string(f.out_channels()) + "]");
  const clapedge::SimdLevel level = parse_level(simd);
  nb::gil_scoped_release release;
  f.run(wave.data(), samples, valid_samples, out.data(), threads, level);
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "clapedge native kernels: fused similarity + top-k";
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const KernelInputError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("topk", &topk, nb::arg("queries"), nb::arg("vectors"), nb::arg("dtype"),
        nb::arg("num_vectors"), nb::arg("scales").none(), nb::arg("corrections").none(),
        nb::arg("rerank").none(), nb::arg("rerank_dtype"), nb::arg("rerank_factor"),
        nb::arg("k"), nb::arg("threads"), nb::arg("allow").none(), nb::arg("min_score").none(),
        nb::arg("simd"), nb::arg("device"), nb::arg("out_scores"), nb::arg("out_ids"));
  m.def("quantize_int8", &quantize_int8, nb::arg("x"), nb::arg("codes"), nb::arg("scales"),
        nb::arg("threads") = 1);
  m.def("pack_int8", &pack_int8, nb::arg("codes"), nb::arg("packed"), nb::arg("corrections"),
        nb::arg("threads") = 1);
  m.def("unpack_int8", &unpack_int8, nb::arg("packed"), nb::arg("n"), nb::arg("d"),
        nb::arg("codes"));
  m.def("best_simd_level", [] { return std::string(clapedge::simd_level_name(clapedge::best_simd_level())); });
  m.def("available_simd_levels", &available_simd_levels);
  m.def("cuda_available", &clapedge::cuda_available);
  m.def("read_bandwidth", &read_bandwidth, nb::arg("buffer"), nb::arg("threads"),
        nb::arg("repeats"), "Best read bandwidth (bytes/s) of streaming through `buffer`.");
  m.def("int8_peak_ops", &int8_peak_ops, nb::arg("simd"), nb::arg("threads"),
        nb::arg("seconds"), "Peak int8 multiply-accumulates per second of a SIMD level.");
  nb::class_<fe::FrontEnd>(m, "FrontEnd", "Native INT8 conv front end (kernels/frontend.h)")
      .def(nb::new_(&make_front_end), nb::arg("layers"), nb::arg("projection").none())
      .def_prop_ro("out_channels", &fe::FrontEnd::out_channels)
      .def("frames", &fe::FrontEnd::frames, nb::arg("samples"))
      .def("run", &run_front_end, nb::arg("wave"), nb::arg("valid_samples"), nb::arg("out"),
           nb::arg("threads"), nb::arg("simd"));
}
