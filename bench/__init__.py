"""llmc.bench: measuring llmc against its peers, beside the stages it measures (it imports them; none imports it).

probe (timing, alternation, peak memory, floors, the device's name), systems (llmc and its peers behind one
interface), run (`llmc bench`), report (what a run writes, and the README's table). The scripts in this folder
(`python bench/<name>.py`) measure single kernels, passes and settings with the same helpers; results go under
bench/results/<device>/.
"""
