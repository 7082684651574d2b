// Copyright the tvm authors.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The console escape: Ctrl-A x asks the VMM to exit.

/// Ctrl-A, the escape character.
pub(crate) const CTRL_A: u8 = 0x01;
/// After Ctrl-A, asks for the VMM to exit.
pub(crate) const EXIT_KEY: u8 = b'x';

/// Splits host keystrokes into bytes for the guest and the exit request.
///
/// - Ctrl-A x: exit; nothing of the two bytes reaches the guest.
/// - Ctrl-A Ctrl-A: one Ctrl-A for the guest.
/// - Ctrl-A followed by any other byte: both bytes for the guest.
///
/// A Ctrl-A at the end of one read is held until the next byte arrives.
#[derive(Debug, Default)]
pub(crate) struct EscapeParser {
    saw_ctrl_a: bool,
}

impl EscapeParser {
    /// Feeds host bytes, appending what the guest should get to `out`. Returns `true`
    /// when Ctrl-A x was seen; the bytes after it are not looked at.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &byte in input {
            if !self.saw_ctrl_a {
                if byte == CTRL_A {
                    self.saw_ctrl_a = true;
                } else {
                    out.push(byte);
                }
                continue;
            }
            self.saw_ctrl_a = false;
            match byte {
                EXIT_KEY => return true,
                CTRL_A => out.push(CTRL_A),
                other => out.extend_from_slice(&[CTRL_A, other]),
            }
        }
        false
    }

    /// Whether a Ctrl-A is held, waiting for the next byte (which then yields two bytes).
    pub(crate) fn is_holding(&self) -> bool {
        self.saw_ctrl_a
    }

    /// At the end of input: releases a held Ctrl-A, which then goes to the guest as is.
    pub(crate) fn finish(&mut self) -> Option<u8> {
        std::mem::take(&mut self.saw_ctrl_a).then_some(CTRL_A)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(parser: &mut EscapeParser, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let exit = parser.feed(input, &mut out);
        (out, exit)
    }

    #[test]
    fn test_plain_bytes_pass_through() {
        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"ls -l\r"), (b"ls -l\r".to_vec(), false));
        assert!(!p.is_holding());
    }

    #[test]
    fn test_ctrl_a_x_exits() {
        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"ab\x01xcd"), (b"ab".to_vec(), true));
        assert!(!p.is_holding());
        // A bare 'x' is ordinary.
        assert_eq!(run(&mut p, b"x"), (b"x".to_vec(), false));
    }

    #[test]
    fn test_double_ctrl_a_sends_one() {
        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"\x01\x01"), (vec![CTRL_A], false));
        // And Ctrl-A Ctrl-A x is a Ctrl-A followed by a plain 'x'.
        assert_eq!(run(&mut p, b"\x01\x01x"), (vec![CTRL_A, b'x'], false));
    }

    #[test]
    fn test_ctrl_a_other_sends_both() {
        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"\x01c"), (vec![CTRL_A, b'c'], false));
        assert_eq!(run(&mut p, b"\x01X"), (vec![CTRL_A, b'X'], false));
    }

    #[test]
    fn test_escape_split_across_reads() {
        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"a\x01"), (b"a".to_vec(), false));
        assert!(p.is_holding());
        assert_eq!(run(&mut p, b"x"), (Vec::new(), true));

        let mut p = EscapeParser::default();
        assert_eq!(run(&mut p, b"\x01"), (Vec::new(), false));
        assert_eq!(run(&mut p, b"q"), (vec![CTRL_A, b'q'], false));
    }

    #[test]
    fn test_finish_releases_held_ctrl_a() {
        let mut p = EscapeParser::default();
        assert_eq!(p.finish(), None);
        run(&mut p, b"\x01");
        assert_eq!(p.finish(), Some(CTRL_A));
        assert!(!p.is_holding());
        assert_eq!(p.finish(), None);
    }
}
