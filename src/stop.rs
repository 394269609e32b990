//! Stop strings: generation ends where one appears, and text that may still turn into one is held
//! back, so a streaming client never receives any part of a stop string.

pub struct StopText {
    stops: Vec<String>,
    text: String,
    sent: usize,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        StopText { stops, text: String::new(), sent: 0 }
    }

    /// Appends a token's text; returns the text now safe to send and whether a stop string ended it.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        if let Some(cut) = self.stops.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            return (self.take(cut), true);
        }
        let held = self.stops.iter().map(|s| longest_prefix_suffix(&self.text, s)).max().unwrap_or(0);
        (self.take(self.text.len() - held), false)
    }

    /// The text not sent yet (what was held back when generation ends without a stop).
    pub fn rest(&mut self) -> String {
        self.take(self.text.len())
    }

    /// Everything generated, cut before the stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, end: usize) -> String {
        let piece = self.text[self.sent..end.max(self.sent)].to_string();
        self.sent = self.sent.max(end);
        piece
    }
}

/// Bytes at the end of `text` that are a proper prefix of `stop` (always a char boundary of `text`:
/// the match starts where `stop` starts, on a leading byte).
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len()).rev().find(|&k| text.as_bytes().ends_with(&stop.as_bytes()[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut sent = Vec::new();
        for p in pieces {
            let (out, stop) = s.push(p);
            sent.push(out);
            if stop {
                return (sent, true, s.text().to_string());
            }
        }
        sent.push(s.rest());
        (sent, false, s.text().to_string())
    }

    #[test]
    fn no_stops_passes_text_through() {
        assert_eq!(run(&[], &["a", "b"]), (vec!["a".into(), "b".into(), "".into()], false, "ab".into()));
    }

    #[test]
    fn stop_across_tokens_is_never_sent() {
        let (sent, stopped, text) = run(&["END"], &["xy", "E", "N", "Dz"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "xy");
        assert_eq!(text, "xy");
    }

    #[test]
    fn held_text_that_is_no_stop_is_released() {
        let (sent, stopped, text) = run(&["END"], &["E", "N", "x"]);
        assert!(!stopped);
        assert_eq!(sent, vec!["", "", "ENx", ""]);
        assert_eq!(text, "ENx");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_is_kept_whole() {
        let (sent, stopped, _) = run(&["é!", "b"], &["aé", "!b"]);
        assert!(stopped);
        assert_eq!(sent.concat(), "a");
    }
}
