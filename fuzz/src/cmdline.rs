// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The kernel command line: `build_cmdline` (the `--cmdline` text against the kernel's
//! limit) and `load_cmdline` (into guest memory).
//!
//! Input: whether the kernel has a setup header (u8 bit 0), its boot protocol version
//! (u16) and `cmdline_size` (u32), then the text (the rest, lossily UTF-8).
//!
//! Invariants:
//! - the limit is the kernel's `cmdline_size` from protocol 2.06 (255 bytes before, 4095
//!   without a header), never more than 4095 bytes; a longer text is refused with
//!   `CmdlineTooLong`, a text within it is never refused for its length;
//! - a command line the builder accepts loads: guest memory at `CMDLINE_START` holds it
//!   with its NUL, with the same words as the text, and nothing else is written;
//! - no panic, no `error!`, no repeated `warn!`.

use tvm_arch_x86::{build_cmdline, layout, load_cmdline, Error};
use vm_memory::Bytes;

use crate::kernel::{clear_dirty, dirty_pages, with_mem};
use crate::{logger, Input};

/// Runs one input.
pub fn run(data: &[u8]) {
    logger::start_input();
    let mut input = Input::new(data);
    let has_header = input.bool();
    let header = linux_loader::bootparam::setup_header {
        version: input.u16(),
        cmdline_size: input.u32(),
        ..Default::default()
    };
    let text = String::from_utf8_lossy(input.rest()).into_owned();
    let header = has_header.then_some(&header);

    let kernel_max = match header {
        Some(h) if h.version >= 0x0206 && h.cmdline_size != 0 => h.cmdline_size as usize,
        Some(_) => 255,
        None => layout::CMDLINE_MAX_SIZE - 1,
    };
    let max = kernel_max.min(layout::CMDLINE_MAX_SIZE - 1);

    let cmdline = match build_cmdline(&text, header) {
        Ok(c) => c,
        Err(Error::CmdlineTooLong { len, max: m }) => {
            assert_eq!((len, m), (text.len(), max), "CmdlineTooLong fields");
            assert!(
                text.len() > max,
                "a {}-byte command line refused as too long (max {max})",
                text.len()
            );
            return;
        }
        Err(Error::Cmdline(_)) => {
            assert!(text.len() <= max);
            return;
        }
        Err(e) => panic!("unexpected error {e}"),
    };
    assert!(
        text.len() <= max,
        "a {}-byte command line accepted (max {max})",
        text.len()
    );

    with_mem(|mem| {
        clear_dirty(mem);
        load_cmdline(mem, &cmdline).unwrap_or_else(|e| {
            panic!("a command line build_cmdline accepted does not load: {e} ({text:?})")
        });
        let c = cmdline.as_cstring().expect("it loaded");
        let bytes = c.as_bytes_with_nul();
        let mut got = vec![0u8; bytes.len()];
        mem.read_slice(&mut got, layout::CMDLINE_START)
            .expect("in RAM");
        assert_eq!(got, bytes, "guest memory does not hold the command line");
        let loaded = String::from_utf8_lossy(&got[..got.len() - 1]).into_owned();
        // The words stay; a final " -- " with no init args after it may go (the kernel
        // reads both the same).
        let mut words: Vec<&str> = text.split_whitespace().collect();
        let got: Vec<&str> = loaded.split_whitespace().collect();
        if got != words && words.last() == Some(&"--") {
            words.pop();
        }
        assert_eq!(got, words, "loaded {loaded:?} is not the words of {text:?}");
        let first = layout::CMDLINE_START.0 & !0xfff;
        let last = (layout::CMDLINE_START.0 + bytes.len() as u64 - 1) & !0xfff;
        for p in dirty_pages(mem) {
            assert!(
                p >= first && p <= last,
                "loading the command line wrote the page at {p:#x}"
            );
        }
    });
}
