// Host helpers and the preparation kernels of the CUDA xattn_similarity ops: options, input checks,
// the launch plan, inverse row norms and the per-item Gram matrices (on tensor cores for half
// types, through the same tile_product as the cosine tiles; bodies in xattn_blocks.cuh).
#include "xattn_common.cuh"

namespace mefn {
namespace cuda {

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

namespace {

void check_features(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, "xattn_similarity: ", name, " must have shape (batch, length, dim); got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "xattn_similarity (CUDA kernel): ", name, " must be a CUDA tensor; got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "xattn_similarity (CUDA kernel): ", name, " must be float16, bfloat16 or float32; got ", x.scalar_type(),
              " (use backend='reference' or the cpu backend for float64)");
  TORCH_CHECK(x.size(2) > 0, "xattn_similarity: ", name, " has feature dimension 0");
  TORCH_CHECK(x.size(1) <= (1 << 20) && x.size(2) <= (int64_t(1) << 31),
              "xattn_similarity (CUDA kernel): ", name, " is too long: ", x.sizes());
}

at::Tensor lengths_on(const at::Tensor& lengths, const char* name, int64_t batch, const at::Device& device) {
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch, "xattn_similarity: ", name, " must have shape (", batch,
              ",); got ", lengths.sizes());
  TORCH_CHECK(!at::isFloatingType(lengths.scalar_type()) && !at::isComplexType(lengths.scalar_type()) &&
                  lengths.scalar_type() != at::kBool,
              "xattn_similarity: ", name, " must have an integer dtype; got ", lengths.scalar_type());
  TORCH_CHECK(lengths.is_cpu() || lengths.device() == device, "xattn_similarity: ", name, " is on ", lengths.device(),
              " but the features are on ", device);
  return lengths.to(device, at::kLong).contiguous();
}

}  // namespace

Checked check_inputs(const at::Tensor& regions, const at::Tensor& region_lengths, const at::Tensor& words,
                     const at::Tensor& word_lengths) {
  check_features(regions, "regions");
  check_features(words, "words");
  TORCH_CHECK(regions.device() == words.device(), "xattn_similarity: regions (", regions.device(), ") and words (",
              words.device(), ") must be on the same device");
  check_feature_pair(regions, words);
  Checked c;
  c.regions = regions.contiguous();
  c.words = words.contiguous();
  c.rl = lengths_on(region_lengths, "region_lengths", regions.size(0), regions.device());
  c.wl = lengths_on(word_lengths, "word_lengths", words.size(0), words.device());
  if (regions.size(0) > 0 && words.size(0) > 0) {
    // one device->host copy for the four bounds
    at::Tensor b = at::stack({c.rl.min(), c.rl.max(), c.wl.min(), c.wl.max()}).cpu();
    const int64_t* v = b.data_ptr<int64_t>();
    TORCH_CHECK(v[0] >= 1 && v[1] <= regions.size(1), "xattn_similarity: region_lengths must lie in [1, ",
                regions.size(1), "]; got values in [", v[0], ", ", v[1], "]");
    TORCH_CHECK(v[2] >= 1 && v[3] <= words.size(1), "xattn_similarity: word_lengths must lie in [1, ", words.size(1),
                "]; got values in [", v[2], ", ", v[3], "]");
  }
  return c;
}

Plan make_plan(int64_t B_img, int64_t N, int64_t B_txt, int64_t M, size_t elem_size, bool backward) {
  const size_t limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  bool ok = false;
  Plan p = plan_for(B_img, N, B_txt, M, elem_size, backward, limit, &ok);
  TORCH_CHECK(ok, "xattn_similarity (CUDA kernel): N=", N, " regions x M=", M,
              " words is too large for one tile in shared memory (", p.smem, " bytes needed, ", limit,
              " available); use backend='triton', 'cpu' or 'reference'");
  return p;
}

namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) inverse_norms_kernel(const T* __restrict__ x, const int64_t* __restrict__ len,
                                                                 int64_t rows, int L, int64_t d, float* __restrict__ inv) {
  inverse_norms_block<T>(x, len, rows, L, d, inv);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gram_kernel(const T* __restrict__ x, const int64_t* __restrict__ len,
                                                        const float* __restrict__ inv, int L, int64_t d, int Lp,
                                                        bool vec, float* __restrict__ G) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  gram_block<T>(x, len, inv, L, d, Lp, vec, G, smem_raw);
}

}  // namespace

at::Tensor inverse_norms(const at::Tensor& x, const at::Tensor& lengths) {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2);
  at::Tensor inv = at::empty({B * L}, x.options().dtype(at::kFloat));
  if (B * L == 0) return inv;
  const cudaStream_t stream = current_stream();
  const int64_t blocks = (B * L + kWarps - 1) / kWarps;
  MEFN_DISPATCH_TYPES(x.scalar_type(), "mefn_inverse_norms", [&] {
    using T = typename DeviceType<scalar_t>::type;
    inverse_norms_kernel<T><<<blocks, kThreads, 0, stream>>>(reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                                             lengths.data_ptr<int64_t>(), B * L, static_cast<int>(L), d,
                                                             inv.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return inv;
}

at::Tensor gram_matrices(const at::Tensor& x, const at::Tensor& lengths, const at::Tensor& inv) {
  const int64_t B = x.size(0), L = x.size(1), d = x.size(2);
  const int Lp = round16(L);
  at::Tensor G = at::empty({B, Lp, Lp}, x.options().dtype(at::kFloat));
  if (B == 0) return G;
  const cudaStream_t stream = current_stream();
  const size_t limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  MEFN_DISPATCH_TYPES(x.scalar_type(), "mefn_gram_matrices", [&] {
    using T = typename DeviceType<scalar_t>::type;
    {
      const size_t smem = region_bytes(Lp, Lp, sizeof(T), Stage<T>::LD, true, 0) + 4 * size_t(Lp) * sizeof(float);
      TORCH_CHECK(smem <= limit, "xattn_similarity (CUDA kernel): length ", L, " is too long for the Gram kernel");
      C10_CUDA_CHECK(cudaFuncSetAttribute(gram_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      gram_kernel<T><<<B, kThreads, smem, stream>>>(reinterpret_cast<const T*>(x.data_ptr<scalar_t>()),
                                                    lengths.data_ptr<int64_t>(), inv.data_ptr<float>(),
                                                    static_cast<int>(L), d, Lp, rows_vectorizable(x), G.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return G;
}

}  // namespace cuda
}  // namespace mefn
