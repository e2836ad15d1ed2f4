"""Part of the offload Airflow provider."""
