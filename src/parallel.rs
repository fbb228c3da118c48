//! Running a few jobs side by side on scoped threads (recovery's decoding and inserting):
//! one place that spawns, joins in order, and passes a job's panic on as it was.

use std::thread::ScopedJoinHandle;

/// The results of `jobs`, in their order, each run on its own scoped thread; a single job
/// runs on the calling thread. A job that panics panics the caller with the same payload.
pub(crate) fn run_all<T, F>(jobs: Vec<F>) -> Vec<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    if jobs.len() <= 1 {
        return jobs.into_iter().map(|job| job()).collect();
    }
    std::thread::scope(|scope| {
        let workers = jobs.into_iter().map(|job| scope.spawn(job)).collect();
        join_all(workers)
    })
}

/// Joins scoped threads in order, passing a panic on as it was.
pub(crate) fn join_all<'scope, T>(workers: Vec<ScopedJoinHandle<'scope, T>>) -> Vec<T> {
    workers
        .into_iter()
        .map(|worker| match worker.join() {
            Ok(done) => done,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_the_jobs_order_and_a_panic_is_passed_on() {
        let jobs: Vec<_> = (0..5u64).map(|i| move || i * 10).collect();
        assert_eq!(run_all(jobs), vec![0, 10, 20, 30, 40]);
        let one = vec![|| "inline"];
        assert_eq!(run_all(one), vec!["inline"]);
        let caught = std::panic::catch_unwind(|| {
            run_all(vec![
                Box::new(|| 1) as Box<dyn FnOnce() -> i32 + Send>,
                Box::new(|| panic!("job 2 failed")),
            ])
        });
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"job 2 failed"));
    }
}
