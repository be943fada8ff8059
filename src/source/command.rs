//! The standard output of any command, for engines kluis does not know yet.
//!
//! The command runs under `/bin/sh -c`; it fails the backup if it exits non-zero, is killed, or
//! prints a line containing "error" or "fatal" (any case) on its standard error.

use std::process::Stdio;

use super::{ChildOutput, NamedStream, StderrPolicy, StreamSet};
use crate::error::Result;
use crate::progress::Cancel;
use crate::snapshot::Source as SourceRecord;

pub struct CommandSource {
    command: String,
    stream: String,
    spawned: bool,
    warnings: Option<super::Warnings>,
    cancel: Cancel,
}

impl CommandSource {
    /// `stream` is the file name the output gets in the snapshot (the snapshot's name).
    pub fn new(command: impl Into<String>, stream: impl Into<String>) -> CommandSource {
        CommandSource {
            command: command.into(),
            stream: stream.into(),
            spawned: false,
            warnings: None,
            cancel: Cancel::new(),
        }
    }

    /// How errors name the command: its first word only, as the rest may hold secrets.
    fn label(&self) -> String {
        let first = self.command.split_whitespace().next().unwrap_or("");
        format!("command {first:?}")
    }
}

impl StreamSet for CommandSource {
    fn next_stream(&mut self) -> Result<Option<NamedStream>> {
        if self.spawned {
            return Ok(None);
        }
        self.spawned = true;
        let mut sh = super::child_command("/bin/sh");
        sh.arg("-c").arg(&self.command).stdin(Stdio::null());
        let out = ChildOutput::spawn(self.label(), &mut sh, StderrPolicy::Strict)?
            .cancel_on(self.cancel.clone());
        self.warnings = Some(out.warnings());
        Ok(Some(NamedStream {
            name: self.stream.clone(),
            reader: Box::new(out),
        }))
    }

    /// What the command printed on standard error, once it ended successfully.
    fn attach_cancel(&mut self, cancel: Cancel) {
        self.cancel = cancel;
    }

    fn warnings(&self) -> Vec<String> {
        super::collect_warnings(&self.warnings)
    }

    fn finish(&mut self) -> Result<SourceRecord> {
        Ok(SourceRecord::Command {
            command: self.command.clone(),
        })
    }
}
