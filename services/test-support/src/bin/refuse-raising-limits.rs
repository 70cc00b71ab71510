//! `refuse-raising-limits PROGRAM [ARGS...]`: executes PROGRAM in its own place with a seccomp
//! filter that refuses (EPERM) every attempt to change a resource limit, as some sandboxes do.
//! Reading limits still works. Tests use it to reach the path where ingest cannot raise its
//! soft limit on open files.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: refuse-raising-limits PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    if let Err(e) = refuse_setting_limits() {
        eprintln!("refuse-raising-limits: cannot install the seccomp filter: {e}");
        return ExitCode::FAILURE;
    }
    let e = Command::new(&program).args(args).exec();
    eprintln!(
        "refuse-raising-limits: cannot execute {}: {e}",
        program.to_string_lossy()
    );
    ExitCode::FAILURE
}

/// setrlimit always, and prlimit64 when it is given a new limit (its third argument, a
/// pointer, is not null): glibc reads limits through prlimit64 too.
fn refuse_setting_limits() -> anyhow::Result<()> {
    let sets_a_limit = SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::Ne,
        0,
    )?])?;
    let rules = BTreeMap::from([
        (libc::SYS_setrlimit, vec![]),
        (libc::SYS_prlimit64, vec![sets_a_limit]),
    ]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH.try_into()?,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    seccompiler::apply_filter(&program)?;
    Ok(())
}
