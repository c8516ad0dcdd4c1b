"""What hive can place workers on: CPU nodes (and, later, NVIDIA GPUs), and how it chooses."""
