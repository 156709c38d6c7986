"""Memory as something the fleet schedules: sizes, task requests and limits, admission, watchdog."""
