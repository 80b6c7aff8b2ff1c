// vaekernels._C: pybind11 bindings of the CUDA backend's host entry points (ops.h).
// Compiled by the host compiler without CUDA or PyTorch headers; tensors come in as integer addresses.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "ops.h"

#ifndef VK_CUDA_ARCHS
#error "VK_CUDA_ARCHS (the SASS architectures, e.g. \"80;86;89;90\") must be defined by setup.py"
#endif

namespace py = pybind11;

namespace {

std::vector<int> built_archs() {
  std::vector<int> archs;
  std::stringstream list(VK_CUDA_ARCHS);
  std::string item;
  while (std::getline(list, item, ';'))
    if (!item.empty()) archs.push_back(std::stoi(item));
  return archs;
}

py::dict build_info() {
  const int v = vk::cuda_version();
  const std::vector<int> archs = built_archs();
  py::dict info;
  info["archs"] = archs;
  info["ptx"] = archs.empty() ? 0 : archs.back();
  info["cuda"] = std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  info["cudart"] = "static";
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vaekernels CUDA kernels: raw device pointers, sizes, strides, dtype codes and a stream; no torch inside";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  using py::arg;

  m.def("build_info", &build_info, "{'archs': SASS architectures, 'ptx': PTX architecture, 'cuda': CUDA version}");
  m.def("device_problem", &vk::device_problem, arg("device"), nogil,
        "'' when the kernels can run on the device, else the reason");
  m.def("philox_host", &vk::philox_host, arg("seed"), arg("offset"), arg("n"), arg("words"), arg("normals"), nogil,
        "The kernels' Philox stream computed on the host into CPU buffers (uint32 words[2n], float32 normals[n])");

  m.def("gaussian_forward_workspace", &vk::gaussian_forward_workspace, arg("device"), arg("dtype"), arg("numel"),
        arg("rows"), arg("kl_mode"), nogil);
  m.def("gaussian_forward", &vk::gaussian_forward, arg("device"), arg("stream"), arg("dtype"), arg("numel"),
        arg("rows"), arg("mu"), arg("logvar"), arg("prior_mu"), arg("prior_logvar"), arg("seed"), arg("z"),
        arg("kl_mode"), arg("kl"), arg("kl_scale"), arg("workspace"), arg("workspace_bytes"), nogil);
  m.def("gaussian_backward", &vk::gaussian_backward, arg("device"), arg("stream"), arg("dtype"), arg("numel"),
        arg("rows"), arg("mu"), arg("logvar"), arg("prior_mu"), arg("prior_logvar"), arg("seed"), arg("dz"),
        arg("dkl"), arg("dkl_dtype"), arg("kl_mode"), arg("dmu"), arg("dlogvar"), arg("dprior_mu"),
        arg("dprior_logvar"), nogil);

  m.def("vq_workspace", &vk::vq_workspace, arg("device"), arg("n"), arg("k"), arg("d"), arg("precision"), nogil);
  m.def("vq_search", &vk::vq_search, arg("device"), arg("stream"), arg("z"), arg("z_dtype"), arg("z_layout"),
        arg("n"), arg("d"), arg("codebook"), arg("cb_dtype"), arg("k"), arg("precision"), arg("indices"),
        arg("quantized"), arg("q_layout"), arg("counts"), arg("sums"), arg("sq_err"), arg("workspace"),
        arg("workspace_bytes"), nogil);
  m.def("segment_sum_workspace", &vk::segment_sum_workspace, arg("n"), arg("d"));
  m.def("segment_sum", &vk::segment_sum, arg("device"), arg("stream"), arg("z"), arg("z_dtype"), arg("z_layout"),
        arg("n"), arg("d"), arg("codebook"), arg("cb_dtype"), arg("k"), arg("order"), arg("keys"), arg("offsets"),
        arg("coef"), arg("coef_dtype"), arg("scale"), arg("out"), arg("workspace"), arg("workspace_bytes"), nogil);
  m.def("vq_backward", &vk::vq_backward, arg("device"), arg("stream"), arg("dtype"), arg("n"), arg("d"),
        arg("z"), arg("z_layout"), arg("dq"), arg("dq_layout"), arg("codebook"), arg("cb_dtype"), arg("indices"),
        arg("d_commit"), arg("d_commit_dtype"), arg("d_codebook"), arg("d_codebook_dtype"), arg("scale"),
        arg("rotation"), arg("dz"), arg("dz_layout"), arg("dcodebook"), nogil);
}
