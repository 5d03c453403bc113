{
  "targets": [
    {
      "target_name": "hydra_native",
      "sources": ["addon/main.cc", "addon/uffd.cc", "addon/memory.cc", "addon/cow.cc"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags_cc": ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    }
  ]
}
