"""Demo tooling: data generator, `make demo`, `make airflow`, and a real `airflow standalone` for tests."""
