{
  "variables": {
    "kvslim_cuda%": "0",
    "cuda_lib%": "",
    "cuda_lib_dir%": ""
  },
  "target_defaults": {
    "cflags_cc": ["-std=c++17", "-O3", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    "cflags_cc!": ["-std=gnu++14", "-std=gnu++17"],
    "xcode_settings": {
      "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
      "OTHER_CPLUSPLUSFLAGS": ["-O3"]
    }
  },
  "targets": [
    {
      "target_name": "kvslim_avx2",
      "type": "static_library",
      "sources": ["native/cpu/kernels_avx2.cc"],
      "conditions": [
        ["target_arch=='x64'", {
          "cflags_cc": ["-mavx2", "-mfma", "-mf16c"],
          "xcode_settings": { "OTHER_CPLUSPLUSFLAGS": ["-mavx2", "-mfma", "-mf16c"] }
        }]
      ]
    },
    {
      "target_name": "kvslim_avx512",
      "type": "static_library",
      "sources": ["native/cpu/kernels_avx512.cc"],
      "conditions": [
        ["target_arch=='x64'", {
          "cflags_cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                        "-Wno-uninitialized", "-Wno-maybe-uninitialized"],
          "xcode_settings": {
            "OTHER_CPLUSPLUSFLAGS": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
          }
        }]
      ]
    },
    {
      "target_name": "kvslim",
      "dependencies": [
        "<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except",
        "kvslim_avx2",
        "kvslim_avx512"
      ],
      "sources": [
        "native/core/status.cc",
        "native/core/tensor_convert.cc",
        "native/core/paged_store.cc",
        "native/core/kivi_quant.cc",
        "native/core/kivi_store.cc",
        "native/core/kivi_ops.cc",
        "native/core/select/select_policy.cc",
        "native/core/select/streaming.cc",
        "native/core/select/snapkv.cc",
        "native/core/select/h2o.cc",
        "native/core/select/duo.cc",
        "native/core/select/loading_policy.cc",
        "native/core/select/quest.cc",
        "native/core/select/retrieval.cc",
        "native/core/select/actqkv.cc",
        "native/core/index/key_index.cc",
        "native/core/index/page_boxes.cc",
        "native/core/index/flat_index.cc",
        "native/core/index/ivf_index.cc",
        "native/core/index/graph_index.cc",
        "native/core/attention_op.cc",
        "native/core/kv_cache.cc",
        "native/core/kv_cache_batch.cc",
        "native/core/cache_serialize.cc",
        "native/cpu/kernels_scalar.cc",
        "native/cpu/simd_level.cc",
        "native/cpu/thread_pool.cc",
        "native/cpu/attention_decode.cc",
        "native/cpu/attention_decode_tiled.cc",
        "native/cpu/attention_kivi.cc",
        "native/cpu/attention_scores.cc",
        "native/cpu/attention_mass.cc",
        "native/cpu/block_scores.cc",
        "native/cpu/page_bounds.cc",
        "native/cpu/attention_prefill.cc",
        "native/cpu/attention_prefill_heads.cc",
        "native/cpu/cpu_backend.cc",
        "native/cpu/probes.cc",
        "native/cpu/scratch.cc",
        "native/cpu/huge_memory.cc",
        "native/cpu/page_pool.cc",
        "native/cpu/vector_ops.cc",
        "native/napi/addon.cc",
        "native/napi/cache_wrap.cc",
        "native/napi/convert.cc",
        "native/napi/errors.cc",
        "native/napi/async_ops.cc",
        "native/napi/kivi_ops.cc",
        "native/napi/key_index_wrap.cc"
      ],
      "defines": ["NAPI_VERSION=8"],
      "conditions": [
        ["kvslim_cuda==1", {
          "defines": ["KVSLIM_WITH_CUDA=1"],
          "libraries": ["<(cuda_lib)", "-L<(cuda_lib_dir)", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        }, {
          "sources": ["native/cuda/cuda_stub.cc"]
        }]
      ]
    }
  ]
}
