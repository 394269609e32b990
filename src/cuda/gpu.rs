//! One GPU: its primary context and the stream work is enqueued on, device buffers, and the errors of
//! the driver and the launchers in the library's terms. A missing driver, device or kernel image is
//! [`Error::NoDevice`] (instead of cudarc's panic).

use std::ffi::{c_int, CStr};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaGraph, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};

use super::ffi;
use crate::error::{Error, Result};

/// One GPU's primary context and the stream every kernel wrapper enqueues on.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// A failed driver call as the library's device error.
pub(crate) fn driver(operation: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Device {
        backend: "cuda",
        operation: operation.into(),
        code: Some(e.0 as i64),
        message: e.to_string(),
    }
}

pub(crate) fn no_device(reason: impl Into<String>) -> Error {
    Error::NoDevice { backend: "cuda", reason: reason.into() }
}

/// A launcher's `cudaError_t` as a result.
pub(crate) fn check(name: &str, code: c_int) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr(ffi::cudaGetErrorString(code)) }.to_string_lossy();
    Err(Error::Device { backend: "cuda", operation: name.into(), code: Some(code.into()), message: msg.into_owned() })
}

impl Gpu {
    /// GPU `ordinal`, or [`Error::NoDevice`] without a driver, such a device, or kernel code this
    /// build can run on it (probed on one kernel, so a GPU the build has no code for fails here,
    /// clearly, rather than at its first launch).
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: only probes whether libcuda can be loaded.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(no_device("the NVIDIA driver (libcuda) is not installed"));
        }
        let count = CudaContext::device_count().map_err(|e| no_device(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(no_device(format!("device {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("cuCtxCreate"))?;
        ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: queries one kernel's attributes in the current context.
        let probe = unsafe { ffi::fastkv_probe() };
        check("fastkv_probe", probe)
            .map_err(|e| no_device(format!("the kernels of this build do not load on device {ordinal}: {e}")))?;
        let stream = ctx.default_stream();
        Ok(Gpu { ctx, stream })
    }

    /// The raw stream the launchers take.
    pub(crate) fn raw(&self) -> ffi::Stream {
        self.stream.cu_stream() as ffi::Stream
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(host).map_err(driver("cuMemcpyHtoD"))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(driver("cuMemcpyDtoH"))
    }

    /// `len` zeros; at least one value, since the driver allocates no empty buffers.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len.max(1)).map_err(driver("cuMemAlloc"))
    }

    /// Copies `host` to the start of `dst`, enqueued on the stream (e.g. a cache length after prefill).
    pub fn write<T: DeviceRepr>(&self, host: &[T], dst: &mut impl DevicePtrMut<T>) -> Result<()> {
        expect_len("dst", dst.len(), host.len())?;
        self.stream.memcpy_htod(host, dst).map_err(driver("cuMemcpyHtoD"))
    }

    /// What `enqueue` puts on the stream, captured as a CUDA graph to replay; `None` (with a warning) where capture
    /// fails, and the caller goes on launching eagerly.
    pub(crate) fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Option<CudaGraph> {
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream.begin_capture(mode).ok()?;
        let enqueued = enqueue();
        let graph = self.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        match (enqueued, graph) {
            (Ok(()), Ok(Some(g))) => Some(g),
            (e, g) => {
                eprintln!("fastkv: CUDA graph capture failed ({:?}, {:?}); launching eagerly", e.err(), g.err());
                None
            }
        }
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(driver("cuStreamSynchronize"))
    }

    /// The raw address of a device buffer or view, as the pointer type a launcher takes. The guard
    /// cudarc returns only records events when it manages cross-stream synchronisation; all our work
    /// on a buffer is on one stream, so it is dropped at once.
    pub(crate) fn ptr<T, U>(&self, s: &impl DevicePtr<T>) -> *const U {
        s.device_ptr(&self.stream).0 as *const U
    }

    pub(crate) fn ptr_mut<T, U>(&self, s: &mut impl DevicePtrMut<T>) -> *mut U {
        s.device_ptr_mut(&self.stream).0 as *mut U
    }
}

/// A size as a launcher's `int` argument.
pub(crate) fn int(flag: &'static str, v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::invalid(flag, format!("{v} does not fit a 32-bit launch argument")))
}

/// Device buffers hold at least one value (see [`Gpu::zeros`]), so sizes are checked as minimums.
pub(crate) fn expect_len(flag: &'static str, len: usize, needed: usize) -> Result<()> {
    if len < needed {
        return Err(Error::invalid(flag, format!("device buffer has {len} values, needs {needed}")));
    }
    Ok(())
}

/// Values from the start of a strided layout to its last element: `n` steps of each (count, stride)
/// plus `last` contiguous values (0 when any count is 0).
pub(crate) fn span(steps: &[(usize, usize)], last: usize) -> usize {
    if last == 0 || steps.iter().any(|&(n, _)| n == 0) {
        return 0;
    }
    steps.iter().map(|&(n, stride)| (n - 1) * stride).sum::<usize>() + last
}
