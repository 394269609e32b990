//! The parts of the TRITONBACKEND (API 1.19) and TRITONSERVER C APIs this backend calls, declared by
//! hand from `tritonbackend.h` / `tritonserver.h`. They are resolved from the server process at load time.

use std::ffi::{c_char, c_void};

// Opaque server-owned handles.
#[repr(C)]
pub struct Error {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Message {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Model {
    _private: [u8; 0],
}
#[repr(C)]
pub struct ModelInstance {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Request {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Input {
    _private: [u8; 0],
}
#[repr(C)]
pub struct ResponseFactory {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Response {
    _private: [u8; 0],
}
#[repr(C)]
pub struct Output {
    _private: [u8; 0],
}

pub const API_MAJOR: u32 = 1;
pub const API_MINOR: u32 = 19;

// TRITONSERVER_Error_Code
pub const ERROR_INVALID_ARG: u32 = 3;
pub const ERROR_UNAVAILABLE: u32 = 4;
pub const ERROR_UNSUPPORTED: u32 = 5;

// TRITONSERVER_LogLevel
pub const LOG_INFO: u32 = 0;
pub const LOG_WARN: u32 = 1;
pub const LOG_ERROR: u32 = 2;

// TRITONSERVER_DataType
pub const TYPE_BOOL: u32 = 1;
pub const TYPE_INT32: u32 = 8;
pub const TYPE_INT64: u32 = 9;
pub const TYPE_FP32: u32 = 11;
pub const TYPE_FP64: u32 = 12;
pub const TYPE_BYTES: u32 = 13;

// TRITONSERVER_MemoryType
pub const MEMORY_CPU: u32 = 0;
pub const MEMORY_CPU_PINNED: u32 = 1;

/// TRITONBACKEND_ArtifactType: the model directory is on the local file system.
pub const ARTIFACT_FILESYSTEM: u32 = 0;

/// TRITONSERVER_RESPONSE_COMPLETE_FINAL / TRITONSERVER_REQUEST_RELEASE_ALL.
pub const FLAG_FINAL: u32 = 1;
pub const RELEASE_ALL: u32 = 1;

extern "C" {
    pub fn TRITONSERVER_ErrorNew(code: u32, msg: *const c_char) -> *mut Error;
    pub fn TRITONSERVER_ErrorDelete(error: *mut Error);
    pub fn TRITONSERVER_ErrorMessage(error: *mut Error) -> *const c_char;
    pub fn TRITONSERVER_LogMessage(level: u32, file: *const c_char, line: i32, msg: *const c_char) -> *mut Error;
    pub fn TRITONSERVER_MessageSerializeToJson(
        msg: *mut Message,
        base: *mut *const c_char,
        size: *mut usize,
    ) -> *mut Error;
    pub fn TRITONSERVER_MessageDelete(msg: *mut Message) -> *mut Error;

    pub fn TRITONBACKEND_ApiVersion(major: *mut u32, minor: *mut u32) -> *mut Error;
    pub fn TRITONBACKEND_ModelName(model: *mut Model, name: *mut *const c_char) -> *mut Error;
    pub fn TRITONBACKEND_ModelConfig(model: *mut Model, version: u32, config: *mut *mut Message) -> *mut Error;
    pub fn TRITONBACKEND_ModelRepository(model: *mut Model, kind: *mut u32, location: *mut *const c_char)
        -> *mut Error;
    pub fn TRITONBACKEND_ModelSetState(model: *mut Model, state: *mut c_void) -> *mut Error;
    pub fn TRITONBACKEND_ModelState(model: *mut Model, state: *mut *mut c_void) -> *mut Error;
    pub fn TRITONBACKEND_ModelInstanceModel(instance: *mut ModelInstance, model: *mut *mut Model) -> *mut Error;

    pub fn TRITONBACKEND_RequestInput(req: *mut Request, name: *const c_char, input: *mut *mut Input) -> *mut Error;
    pub fn TRITONBACKEND_InputProperties(
        input: *mut Input,
        name: *mut *const c_char,
        datatype: *mut u32,
        shape: *mut *const i64,
        dims: *mut u32,
        byte_size: *mut u64,
        buffer_count: *mut u32,
    ) -> *mut Error;
    pub fn TRITONBACKEND_InputBuffer(
        input: *mut Input,
        index: u32,
        buffer: *mut *const c_void,
        byte_size: *mut u64,
        memory_type: *mut u32,
        memory_type_id: *mut i64,
    ) -> *mut Error;
    pub fn TRITONBACKEND_RequestRelease(req: *mut Request, flags: u32) -> *mut Error;

    pub fn TRITONBACKEND_ResponseFactoryNew(factory: *mut *mut ResponseFactory, req: *mut Request) -> *mut Error;
    pub fn TRITONBACKEND_ResponseFactoryDelete(factory: *mut ResponseFactory) -> *mut Error;
    pub fn TRITONBACKEND_ResponseFactoryIsCancelled(factory: *mut ResponseFactory, cancelled: *mut bool) -> *mut Error;
    pub fn TRITONBACKEND_ResponseFactorySendFlags(factory: *mut ResponseFactory, flags: u32) -> *mut Error;
    pub fn TRITONBACKEND_ResponseNewFromFactory(resp: *mut *mut Response, factory: *mut ResponseFactory) -> *mut Error;
    pub fn TRITONBACKEND_ResponseDelete(resp: *mut Response) -> *mut Error;
    pub fn TRITONBACKEND_ResponseOutput(
        resp: *mut Response,
        output: *mut *mut Output,
        name: *const c_char,
        datatype: u32,
        shape: *const i64,
        dims: u32,
    ) -> *mut Error;
    pub fn TRITONBACKEND_OutputBuffer(
        output: *mut Output,
        buffer: *mut *mut c_void,
        byte_size: u64,
        memory_type: *mut u32,
        memory_type_id: *mut i64,
    ) -> *mut Error;
    pub fn TRITONBACKEND_ResponseSend(resp: *mut Response, flags: u32, error: *mut Error) -> *mut Error;
}
