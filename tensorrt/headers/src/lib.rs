//! Empty: this crate exists only so `cargo metadata` fetches trtx-sys (see Cargo.toml).
