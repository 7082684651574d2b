// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Fuzz target `snapshot`: see `tvm_fuzz::snapshot` for the input layout and the invariants.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tvm_fuzz::snapshot::run(data));
