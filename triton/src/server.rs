//! Safe wrappers over the few server calls the backend makes: errors, logging, model config, request
//! inputs and response factories. Every `unsafe` block of the crate outside the entry points is here.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::ptr;

use crate::ffi;

/// Turns a server error into its message, freeing it (we own errors the server returns).
fn check(err: *mut ffi::Error) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null error returned by the server is valid until we delete it, once, here.
    unsafe {
        let msg = CStr::from_ptr(ffi::TRITONSERVER_ErrorMessage(err)).to_string_lossy().into_owned();
        ffi::TRITONSERVER_ErrorDelete(err);
        Err(msg)
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).expect("NULs were replaced")
}

/// A new server error; the caller hands it to the server, which takes ownership.
pub fn error(code: u32, msg: &str) -> *mut ffi::Error {
    // SAFETY: the server copies the message.
    unsafe { ffi::TRITONSERVER_ErrorNew(code, c_string(msg).as_ptr()) }
}

pub fn log(level: u32, msg: &str) {
    // SAFETY: both strings outlive the call, which copies them.
    let err = unsafe { ffi::TRITONSERVER_LogMessage(level, c"fastkv".as_ptr(), 0, c_string(msg).as_ptr()) };
    let _ = check(err);
}

/// The model handle's name, configuration (as JSON) and directory in the repository.
pub struct ModelInfo {
    pub name: String,
    pub config: serde_json::Value,
    pub dir: PathBuf,
}

impl ModelInfo {
    /// # Safety
    /// `model` must be a live model handle.
    pub unsafe fn read(model: *mut ffi::Model) -> Result<Self, String> {
        let mut name: *const c_char = ptr::null();
        check(ffi::TRITONBACKEND_ModelName(model, &mut name))?;
        let mut msg: *mut ffi::Message = ptr::null_mut();
        check(ffi::TRITONBACKEND_ModelConfig(model, 1, &mut msg))?;
        let (mut base, mut size): (*const c_char, usize) = (ptr::null(), 0);
        let json = check(ffi::TRITONSERVER_MessageSerializeToJson(msg, &mut base, &mut size))
            .map(|()| std::slice::from_raw_parts(base as *const u8, size).to_vec());
        check(ffi::TRITONSERVER_MessageDelete(msg))?;
        let config = serde_json::from_slice(&json?).map_err(|e| format!("model config is not JSON: {e}"))?;
        let (mut kind, mut location): (u32, *const c_char) = (0, ptr::null());
        check(ffi::TRITONBACKEND_ModelRepository(model, &mut kind, &mut location))?;
        if kind != ffi::ARTIFACT_FILESYSTEM {
            return Err("the model repository must be on the local file system".into());
        }
        Ok(ModelInfo {
            name: CStr::from_ptr(name).to_string_lossy().into_owned(),
            config,
            dir: PathBuf::from(CStr::from_ptr(location).to_string_lossy().into_owned()),
        })
    }
}

/// One input tensor, copied out of the request.
pub struct Tensor {
    pub dtype: u32,
    pub data: Vec<u8>,
}

/// The input `name` of `req`, `None` when the request does not have it.
///
/// # Safety
/// `req` must be a live, not yet released request.
pub unsafe fn input(req: *mut ffi::Request, name: &str) -> Result<Option<Tensor>, String> {
    let mut input: *mut ffi::Input = ptr::null_mut();
    if check(ffi::TRITONBACKEND_RequestInput(req, c_string(name).as_ptr(), &mut input)).is_err() {
        return Ok(None);
    }
    let (mut dtype, mut byte_size, mut buffers) = (0u32, 0u64, 0u32);
    let (mut shape, mut dims): (*const i64, u32) = (ptr::null(), 0);
    check(ffi::TRITONBACKEND_InputProperties(
        input,
        ptr::null_mut(),
        &mut dtype,
        &mut shape,
        &mut dims,
        &mut byte_size,
        &mut buffers,
    ))?;
    let mut data = Vec::with_capacity(byte_size as usize);
    for i in 0..buffers {
        let (mut buf, mut len): (*const c_void, u64) = (ptr::null(), 0);
        let (mut mem, mut mem_id) = (ffi::MEMORY_CPU, 0i64);
        check(ffi::TRITONBACKEND_InputBuffer(input, i, &mut buf, &mut len, &mut mem, &mut mem_id))?;
        if mem != ffi::MEMORY_CPU && mem != ffi::MEMORY_CPU_PINNED {
            return Err(format!("input {name} is not in CPU memory"));
        }
        data.extend_from_slice(std::slice::from_raw_parts(buf as *const u8, len as usize));
    }
    Ok(Some(Tensor { dtype, data }))
}

/// Releases a request back to the server once its inputs were copied.
///
/// # Safety
/// `req` must be a live request, released only here.
pub unsafe fn release(req: *mut ffi::Request) {
    if let Err(e) = check(ffi::TRITONBACKEND_RequestRelease(req, ffi::RELEASE_ALL)) {
        log(ffi::LOG_ERROR, &format!("cannot release a request: {e}"));
    }
}

/// One output tensor of a response, shape [1].
pub enum Value<'a> {
    Text(&'a str),
    I64(i64),
    F64(f64),
}

/// Sends any number of responses for one request, from any thread; deleted on drop.
pub struct Factory(*mut ffi::ResponseFactory);

// SAFETY: Triton's response factories may be used from any thread. Each belongs to one request:
// its sink on the scheduler's thread uses it, or — when the request is refused before the sink ever
// runs — the thread that submitted it; never both at once.
unsafe impl Send for Factory {}
unsafe impl Sync for Factory {}

impl Factory {
    /// # Safety
    /// `req` must be a live, not yet released request.
    pub unsafe fn new(req: *mut ffi::Request) -> Result<Self, String> {
        let mut f = ptr::null_mut();
        check(ffi::TRITONBACKEND_ResponseFactoryNew(&mut f, req))?;
        Ok(Factory(f))
    }

    /// Whether the client cancelled the request or went away.
    pub fn is_cancelled(&self) -> bool {
        let mut cancelled = false;
        // SAFETY: the factory is live while `self` is.
        let err = unsafe { ffi::TRITONBACKEND_ResponseFactoryIsCancelled(self.0, &mut cancelled) };
        check(err).is_ok() && cancelled
    }

    pub fn send(&self, outputs: &[(&str, Value)], last: bool) -> Result<(), String> {
        let mut resp = ptr::null_mut();
        // SAFETY: the factory is live; the response is sent (which frees it) or deleted below.
        unsafe {
            check(ffi::TRITONBACKEND_ResponseNewFromFactory(&mut resp, self.0))?;
            let filled = outputs.iter().try_for_each(|(name, v)| add_output(resp, name, v));
            if let Err(e) = filled {
                let _ = check(ffi::TRITONBACKEND_ResponseDelete(resp));
                return Err(e);
            }
            check(ffi::TRITONBACKEND_ResponseSend(resp, if last { ffi::FLAG_FINAL } else { 0 }, ptr::null_mut()))
        }
    }

    /// Ends the request with an error response.
    pub fn send_error(&self, code: u32, msg: &str) {
        let mut resp = ptr::null_mut();
        // SAFETY: as in `send`; the server does not take ownership of the error it is sent.
        let sent = unsafe {
            check(ffi::TRITONBACKEND_ResponseNewFromFactory(&mut resp, self.0)).and_then(|()| {
                let err = error(code, msg);
                let sent = check(ffi::TRITONBACKEND_ResponseSend(resp, ffi::FLAG_FINAL, err));
                ffi::TRITONSERVER_ErrorDelete(err);
                sent
            })
        };
        if let Err(e) = sent {
            log(ffi::LOG_ERROR, &format!("cannot send an error response ({msg}): {e}"));
        }
    }

    /// Ends the request without another response (after a cancellation).
    pub fn finish(&self) {
        // SAFETY: the factory is live.
        let _ = check(unsafe { ffi::TRITONBACKEND_ResponseFactorySendFlags(self.0, ffi::FLAG_FINAL) });
    }
}

impl Drop for Factory {
    fn drop(&mut self) {
        // SAFETY: the factory was created by `new` and is deleted once.
        let _ = check(unsafe { ffi::TRITONBACKEND_ResponseFactoryDelete(self.0) });
    }
}

/// Adds one [1]-shaped output to `resp` and fills it.
unsafe fn add_output(resp: *mut ffi::Response, name: &str, v: &Value) -> Result<(), String> {
    let (dtype, bytes) = match v {
        // BYTES elements are a 4-byte little-endian length and the bytes.
        Value::Text(s) => (ffi::TYPE_BYTES, [&(s.len() as u32).to_le_bytes()[..], s.as_bytes()].concat()),
        Value::I64(x) => (ffi::TYPE_INT64, x.to_le_bytes().to_vec()),
        Value::F64(x) => (ffi::TYPE_FP64, x.to_le_bytes().to_vec()),
    };
    let mut out = ptr::null_mut();
    check(ffi::TRITONBACKEND_ResponseOutput(resp, &mut out, c_string(name).as_ptr(), dtype, [1i64].as_ptr(), 1))?;
    let (mut buf, mut mem, mut mem_id): (*mut c_void, u32, i64) = (ptr::null_mut(), ffi::MEMORY_CPU, 0);
    check(ffi::TRITONBACKEND_OutputBuffer(out, &mut buf, bytes.len() as u64, &mut mem, &mut mem_id))?;
    if mem != ffi::MEMORY_CPU && mem != ffi::MEMORY_CPU_PINNED {
        return Err(format!("output {name} was not given CPU memory"));
    }
    ptr::copy_nonoverlapping(bytes.as_ptr(), buf as *mut u8, bytes.len());
    Ok(())
}
