"""mmtta_ros: online multi-modal test-time adaptation of a camera+LiDAR segmenter."""
