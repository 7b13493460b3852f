// Runs an AOTInductor package that calls fused_nll's ops from C++, with no Python:
// the deployment path of docs/deployment.md, built and run by tests/test_deployment.py.
//
//   aoti_runner OP_LIBRARY PACKAGE DEVICE OUT_PREFIX INPUT...
//   DEVICE = the package's device: cpu | cuda
//   INPUT  = FILE:DTYPE:SHAPE, e.g. logits.bin:float32:8x10 (raw bytes, row-major;
//            DTYPE float32 | float64 | bfloat16 | float16 | int64 | int32; SHAPE "" = 0-dim)
//
// Writes output i's raw bytes (contiguous, on the host) to OUT_PREFIX<i>.bin and prints
// one line per output: "output <i> <dtype> <d0>x<d1>...".
//
// OP_LIBRARY is fused_nll's op library (`python -m fused_nll info` prints its path).
// It is dlopen'ed before the package is loaded, so that its static registrations
// define the fused_nll ops the package calls; RTLD_NOW also proves that the
// library needs no Python symbols.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "aoti_runner: %s\n", what.c_str());
  std::exit(2);
}

at::ScalarType dtype_of(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float64") return at::kDouble;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  if (name == "int64") return at::kLong;
  if (name == "int32") return at::kInt;
  fail("unknown dtype " + name);
}

// FILE:DTYPE:SHAPE -> a tensor holding the file's bytes.
at::Tensor read_input(const std::string& spec) {
  const auto a = spec.find(':'), b = spec.rfind(':');
  if (a == std::string::npos || a == b) fail("input must be FILE:DTYPE:SHAPE, got " + spec);
  std::vector<int64_t> shape;
  std::istringstream dims(spec.substr(b + 1));
  for (std::string d; std::getline(dims, d, 'x');) shape.push_back(std::stoll(d));
  auto t = at::empty(shape, at::TensorOptions().dtype(dtype_of(spec.substr(a + 1, b - a - 1))));
  std::ifstream f(spec.substr(0, a), std::ios::binary);
  f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  if (!f) fail("could not read " + std::to_string(t.nbytes()) + " bytes from " + spec.substr(0, a));
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) fail("usage: aoti_runner OP_LIBRARY PACKAGE DEVICE OUT_PREFIX INPUT...");
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) fail(std::string("dlopen: ") + dlerror());

  torch::inductor::AOTIModelPackageLoader loader(argv[2]);
  std::vector<at::Tensor> inputs;
  const at::Device device(argv[3]);
  for (int i = 5; i < argc; ++i) inputs.push_back(read_input(argv[i]).to(device));
  const std::vector<at::Tensor> outputs = loader.run(inputs);

  for (size_t i = 0; i < outputs.size(); ++i) {
    const at::Tensor out = outputs[i].to(at::kCPU).contiguous();
    const std::string path = std::string(argv[4]) + std::to_string(i) + ".bin";
    std::ofstream f(path, std::ios::binary);
    f.write(static_cast<const char*>(out.data_ptr()), static_cast<std::streamsize>(out.nbytes()));
    if (!f) fail("could not write " + path);
    std::string shape;
    for (const int64_t d : out.sizes()) shape += (shape.empty() ? "" : "x") + std::to_string(d);
    std::printf("output %zu %s %s\n", i, c10::toString(out.scalar_type()), shape.c_str());
  }
  return 0;
}
