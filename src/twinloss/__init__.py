"""twinloss: the TwinFlow objective and any-step samplers for any flow backbone."""

from twinloss.protocol import Conditioning, VelocityModel
from twinloss.teachers import EMATeacher, OnlineTeacher, Teacher

__version__ = "0.1.0"
