// The `cpu` backend of bcdcore.ops: fused proximal step (SGD, momentum, Adam forms), damping, and the damped
// write fused into the step, in one pass over memory, threaded with at::parallel_for and vectorised.
// Built as the Python module `bcdcore._C` (setup.py) or JIT-built by bcdcore/_compiled.py.
//
// The per-element math is fused_math.h (shared with the CUDA kernels), the dispatch ladder fused_dispatch.h.
// Vectorisation: the kernel body (fused_cpu_impl.h) is compiled three times on x86-64 with GCC: baseline
// x86-64, AVX2+FMA and AVX-512, and the widest one the processor supports is picked when the module loads
// (BCD_CPU_ISA=default|avx2|avx512 forces one; `set_isa` switches at run time for tests). The build uses
// -ffp-contract=off so no multiply-add is fused: every element is computed with the reference's own roundings.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "fused_bind.h"
#include "fused_common.h"
#include "fused_dispatch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define BCD_MULTI_ISA 1
#else
#define BCD_MULTI_ISA 0
#endif

namespace bcd_isa_default {
#include "fused_cpu_impl.h"
}  // namespace bcd_isa_default

#if BCD_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
namespace bcd_isa_avx2 {
#include "fused_cpu_impl.h"
}  // namespace bcd_isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,bmi2")
namespace bcd_isa_avx512 {
#include "fused_cpu_impl.h"
}  // namespace bcd_isa_avx512
#pragma GCC pop_options
#endif

namespace {

using RunFn = void (*)(const bcd::Job&, double*, int64_t, int64_t);

constexpr int64_t kTask = bcd_isa_default::kTask;
constexpr int64_t kGrainTasks = 2;  // threads only from 3 tasks (more than 32K elements) up

struct Isa {
  const char* name;
  RunFn fn;
};

bool isa_supported(const std::string& name) {
  if (name == "default") return true;
#if BCD_MULTI_ISA
  __builtin_cpu_init();
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (name == "avx512")
    return isa_supported("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return false;
}

Isa isa_by_name(const std::string& name) {
#if BCD_MULTI_ISA
  if (name == "avx512") return {"avx512", &bcd_isa_avx512::run_tasks};
  if (name == "avx2") return {"avx2", &bcd_isa_avx2::run_tasks};
#endif
  (void)name;
  return {"default", &bcd_isa_default::run_tasks};
}

std::vector<std::string> available_isas() {
  std::vector<std::string> v;
  for (const char* n : {"default", "avx2", "avx512"})
    if (isa_supported(n)) v.emplace_back(n);
  return v;
}

Isa pick_isa() {
  const char* env = std::getenv("BCD_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const std::string want(env);
    TORCH_CHECK_VALUE(want == "default" || want == "avx2" || want == "avx512",
                      "BCD_CPU_ISA=", want, " is not one of default, avx2, avx512");
    TORCH_CHECK_VALUE(isa_supported(want), "BCD_CPU_ISA=", want, " is not supported by this processor or build");
    return isa_by_name(want);
  }
  const auto v = available_isas();
  return isa_by_name(v.back());
}

Isa& current_isa() {
  static Isa isa = pick_isa();
  return isa;
}

std::tuple<at::Tensor, at::Tensor> run(const bcd::Job& given, const at::Tensor& x) {
  bcd::Job job = given;
  // A step whose rule state says "stopped" is not applied: on the CPU the flag is read here (no device to keep
  // it on); the step becomes the norms pass plus its damped write, if any, as the CUDA kernel does per block.
  if (job.skip != nullptr && job.skip[0] != 0.0) {
    job.form = bcd::kNorms;
    job.mode = bcd::skipped_mode(job.mode);
  }
  const int64_t n_tasks = (job.n + kTask - 1) / kTask;
  const bool norms = job.form != bcd::kDamp;
  double stack_partials[64];
  std::vector<double> heap_partials;
  double* p = nullptr;
  if (norms) {
    if (2 * n_tasks <= 64) {
      p = stack_partials;
    } else {
      heap_partials.resize(static_cast<size_t>(2 * n_tasks));
      p = heap_partials.data();
    }
  }
  const RunFn fn = current_isa().fn;
  at::parallel_for(0, n_tasks, kGrainTasks, [&](int64_t t0, int64_t t1) { fn(job, p, t0, t1); });
  if (!norms) return {};
  double r2 = 0.0, d2 = 0.0;
  for (int64_t t = 0; t < n_tasks; ++t) {  // fixed order: bitwise reproducible for any thread count
    r2 += p[2 * t];
    d2 += p[2 * t + 1];
  }
  const auto opts = x.options().dtype(bcd::math_type(x));
  at::Tensor r2t = at::scalar_tensor(r2, opts), d2t = at::scalar_tensor(d2, opts);
  if (job.rule != nullptr) {  // rule_check: the norms as returned (rounded to the math type), in double
    bcd::rule_update(job.rule, r2t.item<double>(), d2t.item<double>(), job.coef, job.index);
  }
  return {r2t, d2t};
}

// The multi-slice form: every slice is the one-buffer job on its part of the buffers (pointers moved, its own
// lam and gamma), cut into the same fixed tasks; the (slice, task) pairs are spread over the threads together and
// each slice's partials are added in task order, so a slice's values and norms are the bits of a one-buffer call.
std::tuple<at::Tensor, at::Tensor> run_multi(const bcd::Job& base, const bcd::Slices& sl, const at::Tensor& x) {
  const int64_t count = sl.count;
  const int64_t esz = static_cast<int64_t>(x.element_size());
  const int64_t msz = static_cast<int64_t>(c10::elementSize(bcd::math_type(x)));
  auto moved = [](const void* p, int64_t by) -> char* {
    return p == nullptr ? nullptr : const_cast<char*>(static_cast<const char*>(p)) + by;
  };
  std::vector<bcd::Job> jobs(static_cast<size_t>(count), base);
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  for (int64_t s = 0; s < count; ++s) {
    bcd::Job& j = jobs[s];
    const int64_t o = sl.start[s];
    j.n = sl.n[s];
    j.lam = sl.lam[s];
    if (sl.gamma != nullptr) j.gamma = sl.gamma[s];
    j.x = moved(base.x, o * esz);
    j.g = moved(base.g, o * esz);
    j.a = moved(base.a, o * esz);
    j.out = moved(base.out, o * esz);
    j.s0 = moved(base.s0, o * msz);
    j.s1 = moved(base.s1, o * msz);
    first[s + 1] = first[s] + (j.n + kTask - 1) / kTask;
  }
  const int64_t total = first[count];
  const bool norms = base.form != bcd::kDamp;
  std::vector<double> partials(norms ? static_cast<size_t>(2 * total) : 0);
  double* p = norms ? partials.data() : nullptr;
  const RunFn fn = current_isa().fn;
  at::parallel_for(0, total, kGrainTasks, [&](int64_t t0, int64_t t1) {
    int64_t s = std::upper_bound(first.begin(), first.end(), t0) - first.begin() - 1;
    for (int64_t t = t0; t < t1; ++s) {  // the tasks of slice s in [t0, t1), then the next slice's
      const int64_t e = std::min(t1, first[s + 1]);
      if (e > t) fn(jobs[s], p ? p + 2 * first[s] : nullptr, t - first[s], e - first[s]);
      t = std::max(t, e);
    }
  });
  if (!norms) return {};
  at::Tensor both = at::zeros({2, count}, x.options().dtype(at::kDouble));
  double* out = both.data_ptr<double>();
  for (int64_t s = 0; s < count; ++s) {
    double r2 = 0.0, d2 = 0.0;
    for (int64_t t = first[s]; t < first[s + 1]; ++t) {  // task order, as run() adds them
      r2 += p[2 * t];
      d2 += p[2 * t + 1];
    }
    out[s] = r2;
    out[count + s] = d2;
  }
  both = both.to(bcd::math_type(x));
  return {both.select(0, 0), both.select(0, 1)};
}

std::string get_isa() { return current_isa().name; }

void set_isa(const std::string& name) {
  TORCH_CHECK_VALUE(name == "default" || name == "avx2" || name == "avx512", "unknown ISA ", name,
                    "; use default, avx2 or avx512");
  TORCH_CHECK_VALUE(isa_supported(name), "ISA ", name, " is not supported by this processor or build");
  current_isa() = isa_by_name(name);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  bcd::Ops<c10::DeviceType::CPU, run, run_multi>::define(
      m, "bcdcore fused proximal update ops, CPU backend (see csrc/README.md)");
  m.def("isa", &get_isa, "instruction set the kernels run with");
  m.def("set_isa", &set_isa, "switch the instruction set (default, avx2, avx512)", py::arg("name"));
  m.def("available_isas", &available_isas, "instruction sets this processor and build support");
  m.attr("TASK_ELEMENTS") = kTask;
}
