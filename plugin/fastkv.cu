// The one translation unit nvcc compiles (build.rs): every kernel file of plugin/, so the device
// code of all launchers lands in one module — one fatbin for sm_80, sm_90 and compute_90 PTX.
#include "attention.cu"
#include "gather.cu"
#include "model.cu"
#include "rope_norm.cu"
#include "scores.cu"
#include "select.cu"
