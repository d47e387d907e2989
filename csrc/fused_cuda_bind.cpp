// Python module `bcdcore._C_cuda`: validates the tensors (fused_common.h), then runs the CUDA kernels of
// fused_cuda.cu on the current stream of x's device. Importing it needs no GPU; calling it does.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "fused_common.h"
#include "fused_cuda.h"

namespace {

// One allocation per call: [r2, d2 (padded to 16 bytes) | 2 * max_blocks double partials]; r2 and d2 are
// returned as 0-dim views of it (the partials are scratch for the kernel, stream-ordered by the allocator).
std::tuple<at::Tensor, at::Tensor> run(const bcd::Job& job, const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (job.form == bcd::kDamp) {
    C10_CUDA_CHECK(bcd_cuda::launch(job, device, stream, nullptr, nullptr, nullptr));
    return {};
  }
  const at::ScalarType mt = bcd::math_type(x);
  const int64_t esz = static_cast<int64_t>(c10::elementSize(mt));
  const int64_t head = 16 / esz;  // r2, d2 and padding
  const int64_t n_partials = 2 * static_cast<int64_t>(bcd_cuda::max_blocks(device));
  at::Tensor buf = at::empty({head + n_partials * 8 / esz}, x.options().dtype(mt));
  char* base = static_cast<char*>(buf.data_ptr());
  C10_CUDA_CHECK(bcd_cuda::launch(job, device, stream, reinterpret_cast<double*>(base + 16), base, base + esz));
  return {buf.select(0, 0), buf.select(0, 1)};
}

std::tuple<at::Tensor, at::Tensor> sgd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, double lr,
                                       double lam, c10::optional<double> gamma, c10::optional<at::Tensor> out) {
  bcd::Job job;
  bcd::check_args("prox_sgd_step_", c10::DeviceType::CUDA, bcd::named(x, &g, a, out, nullptr, "", nullptr, ""),
                  job);
  bcd::set_mode("prox_sgd_step_", gamma, out.has_value(), job);
  bcd::prep_sgd(job, lr, lam);
  bcd::fill_ptrs(job, x, &g, a, out, nullptr, nullptr);
  return run(job, x);
}

std::tuple<at::Tensor, at::Tensor> momentum(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                                            const at::Tensor& buf, double lr, double lam, double mu,
                                            bool nesterov, c10::optional<double> gamma,
                                            c10::optional<at::Tensor> out) {
  bcd::Job job;
  bcd::check_args("prox_momentum_step_", c10::DeviceType::CUDA,
                  bcd::named(x, &g, a, out, &buf, "buf", nullptr, ""), job);
  bcd::set_mode("prox_momentum_step_", gamma, out.has_value(), job);
  bcd::prep_momentum(job, lr, lam, mu, nesterov);
  bcd::fill_ptrs(job, x, &g, a, out, &buf, nullptr);
  return run(job, x);
}

std::tuple<at::Tensor, at::Tensor> adam(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a,
                                        const at::Tensor& m, const at::Tensor& v, double lr, double lam,
                                        double beta1, double beta2, double eps, int64_t step,
                                        c10::optional<double> gamma, c10::optional<at::Tensor> out) {
  bcd::Job job;
  bcd::check_args("prox_adam_step_", c10::DeviceType::CUDA, bcd::named(x, &g, a, out, &m, "m", &v, "v"), job);
  bcd::set_mode("prox_adam_step_", gamma, out.has_value(), job);
  bcd::prep_adam("prox_adam_step_", job, lr, lam, beta1, beta2, eps, step);
  bcd::fill_ptrs(job, x, &g, a, out, &m, &v);
  return run(job, x);
}

void damp(const at::Tensor& x, const at::Tensor& a, double gamma, c10::optional<at::Tensor> out) {
  bcd::Job job;
  bcd::check_args("damp_", c10::DeviceType::CUDA, bcd::named(x, nullptr, a, out, nullptr, "", nullptr, ""), job);
  bcd::set_mode("damp_", gamma, out.has_value(), job);
  job.form = bcd::kDamp;
  bcd::fill_ptrs(job, x, nullptr, a, out, nullptr, nullptr);
  run(job, x);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "bcdcore fused proximal update ops, CUDA backend (see csrc/README.md)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("sgd", &sgd, "fused proximal SGD step; returns (||r||^2, ||x-a||^2) at the pre-step point", py::arg("x"),
        py::arg("g"), py::arg("a"), py::arg("lr"), py::arg("lam"), py::arg("gamma") = py::none(),
        py::arg("out") = py::none(), nogil);
  m.def("momentum", &momentum, "fused proximal heavy-ball step (torch.optim.SGD semantics, dampening 0)",
        py::arg("x"), py::arg("g"), py::arg("a"), py::arg("buf"), py::arg("lr"), py::arg("lam"),
        py::arg("momentum"), py::arg("nesterov") = false, py::arg("gamma") = py::none(),
        py::arg("out") = py::none(), nogil);
  m.def("adam", &adam, "fused proximal Adam step (bias-corrected, step counts from 1)", py::arg("x"),
        py::arg("g"), py::arg("a"), py::arg("m"), py::arg("v"), py::arg("lr"), py::arg("lam"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("step"), py::arg("gamma") = py::none(),
        py::arg("out") = py::none(), nogil);
  m.def("damp", &damp, "x <- a + gamma (x - a); with out: out <- that and x <- a", py::arg("x"), py::arg("a"),
        py::arg("gamma"), py::arg("out") = py::none(), nogil);
}
