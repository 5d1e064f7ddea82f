"""ROS 2 bridge over DDS (Cyclone DDS from Python, no ROS installation): message types (msgs), the ROS-to-DDS
mapping and Cyclone configuration (dds), and a ROS 2 robot behind deploy.types.Robot (robot.Ros2Robot).

Needs the ``ros2`` extra (``pip install -e ".[ros2]"``: cyclonedds, rosbags); nothing else in ``deploy`` imports it.
"""
